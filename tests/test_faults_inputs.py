"""Issue 23: bad inputs become named bad records in precompute (or a named error before any work)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covt.config import DataConfig, load_config
from covt.images import open_rgb
from precompute.parquet import ParquetSchemaError
from precompute.records import BadRecordError, load_records
from tests.synthetic import sample_parquet_rows

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data/sample"


def conv(question="<image>\nWhat is this?", answer="A photo."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, "PNG" if mode != "F" else "TIFF")
    return buffer.getvalue()


def records_of(tmp_path: Path, entries: list[dict], on_bad="skip"):
    images = tmp_path / "images"
    if not images.exists():
        shutil.copytree(SAMPLE / "images", images)
    (tmp_path / "data.json").write_text(json.dumps(entries))
    return load_records(DataConfig(path=str(tmp_path / "data.json"), image_folder=str(images),
                                   on_bad_record=on_bad))


# --------------------------------------------------------------------------------- image modes
def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_to_white():
    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    data = png(gradient)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = np.asarray(open_rgb(data))
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.round(gradient / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01  # PIL's own convert makes ~99.6% of these pixels white


def test_a_float_image_is_a_bad_record_naming_its_mode(tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copytree(SAMPLE / "images", tmp_path / "images", dirs_exist_ok=True)
    (tmp_path / "images" / "float.tif").write_bytes(png(np.full((8, 8), 0.5, np.float32), "F"))
    records, bad = records_of(tmp_path, [{"id": "float", "image": "float.tif", "conversations": conv()},
                                         {"id": "ok", "image": "chelsea.jpg", "conversations": conv()}])
    assert [r.id for r in records] == ["ok"]
    assert [(b.id, b.kind) for b in bad] == [("float", "image_unreadable")]
    assert "image mode F (32-bit float pixels)" in bad[0].reason


# --------------------------------------------------------------------------------- special tokens
@pytest.mark.parametrize("question, answer, token", [
    ("<image>\nWhat does <|image_pad|> mean?", "A token.", "<|image_pad|>"),
    ("<image>\nWhat is this?", "It is <|sam_pad|> here.", "<|sam_pad|>"),
    ("<image>\nSay <|im_end|> now.", "No.", "<|im_end|>"),
], ids=["image-pad-in-question", "thought-pad-in-answer", "chat-token"])
def test_a_literal_special_token_in_a_turn_is_a_named_bad_record(tmp_path, question, answer, token):
    entries = [{"id": "collides", "image": "chelsea.jpg", "conversations": conv(question, answer)},
               {"id": "ok", "image": "chelsea.jpg", "conversations": conv()}]
    records, bad = records_of(tmp_path, entries)
    assert [r.id for r in records] == ["ok"]
    assert [(b.id, b.kind) for b in bad] == [("collides", "special_token")]
    assert f"holds the literal text {token!r}, a special token of the model" in bad[0].reason
    with pytest.raises(BadRecordError, match=r"bad record id='collides' .*special token"):
        records_of(tmp_path, entries, on_bad="error")


# --------------------------------------------------------------------------------- parquet types
def test_a_parquet_column_of_the_wrong_type_is_named_before_any_shard_is_written(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from precompute.run import precompute

    rows = sample_parquet_rows(DataConfig(path=str(SAMPLE / "conversations.json"),
                                          image_folder=str(SAMPLE / "images")))
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([{"bytes": r["image_bytes"], "path": r["image_relpath"]} for r in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "image_relpath": pa.array(range(len(rows)), pa.int64()),
        "conversations": pa.array([r["conversations"] for r in rows], pa.list_(turn)),
    })
    pq.write_table(table, tmp_path / "covt.parquet")
    cfg = load_config(REPO / "configs/tiny.yaml", [f"cache.dir={tmp_path / 'cache'}", "anchors=[pidinet]",
                                                   f"data.path={tmp_path / 'covt.parquet'}"])
    with pytest.raises(ParquetSchemaError, match=r"covt.parquet: column 'image_relpath' is int64, expected string"):
        precompute(cfg)
    assert not list(tmp_path.rglob("*.partial"))


# --------------------------------------------------------------------------------- over-long samples
def test_a_question_that_leaves_no_room_for_the_answer_is_a_bad_record_at_precompute(tmp_path):
    from precompute.lengths import length_check
    from trainer.tiny_model import ensure_base_model

    cfg = load_config(REPO / "configs/tiny.yaml", [f"model.path={tmp_path / 'base'}", "train.max_length=64"])
    assert length_check(cfg) is None  # no tokenizer yet: not measured
    ensure_base_model(cfg.model)
    check = length_check(cfg)
    long_question = "<image>\n" + "Is the cat on the left of the mat or on the right of it? " * 5
    entries = [{"id": "long", "image": "chelsea.jpg", "conversations": conv(long_question)},
               {"id": "ok", "image": "chelsea.jpg", "conversations": conv()}]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    data = DataConfig(path=str(tmp_path / "data.json"), image_folder=str(SAMPLE / "images"), on_bad_record="skip")
    records, bad = load_records(data, check)
    assert [r.id for r in records] == ["ok"] and [(b.id, b.kind) for b in bad] == [("long", "too_long")]
    assert "fill train.max_length=64: no answer token would be trained" in bad[0].reason
    with pytest.raises(BadRecordError, match=r"bad record id='long' .*train.max_length=64"):
        load_records(DataConfig(path=data.path, image_folder=data.image_folder, on_bad_record="error"), check)
