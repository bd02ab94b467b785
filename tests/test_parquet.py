"""The published CoVT parquet as input: same records and rules as the JSON reader, bytes unchanged, a subset."""
import logging

import pytest

from covt.config import DataConfig, SubsetConfig
from precompute.parquet import ParquetSchemaError
from precompute.records import BadRecordError, load_records
from shards.reader import Cache
from tests.synthetic import sample_parquet_rows, write_covt_parquet, write_synthetic_cache


def conv(first="<image>\nWhat is this?", answer="A photo."):
    return [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]


@pytest.fixture
def sample_rows(sample_data_cfg):
    return sample_parquet_rows(sample_data_cfg)


@pytest.fixture
def parquet_dir(tmp_path, sample_rows):
    """The 7 sample photos split over two files of row groups of 2, plus bad rows of every kind a row can have."""
    good = sample_rows
    img = good[0]["image_bytes"]
    bad = [
        {"id": "truncated", "image_relpath": "t.jpg", "image_bytes": img[: len(img) // 3], "conversations": conv()},
        {"id": "garbage", "image_relpath": "g.jpg", "image_bytes": b"not an image", "conversations": conv()},
        {"id": "nobytes", "image_relpath": "n.jpg", "image_bytes": None, "conversations": conv()},
        {"id": "noimgtok", "image_relpath": "x.jpg", "image_bytes": img, "conversations": conv("What is this?")},
        {"id": "twotok", "image_relpath": "x.jpg", "image_bytes": img, "conversations": conv("<image><image> hi")},
        {"id": "empty", "image_relpath": "x.jpg", "image_bytes": img, "conversations": conv(answer=" ")},
        {"id": good[1]["id"], "image_relpath": "x.jpg", "image_bytes": img, "conversations": conv()},
    ]
    folder = tmp_path / "covt"
    folder.mkdir()
    write_covt_parquet(folder / "train-00000.parquet", good[:4] + bad[:3], row_group_size=2)
    write_covt_parquet(folder / "train-00001.parquet", good[4:] + bad[3:], row_group_size=3)
    return folder


EXPECTED_BAD = {"truncated": "image_unreadable", "garbage": "image_unreadable", "nobytes": "image_missing",
                "noimgtok": "no_image_token", "twotok": "image_count", "empty": "empty_turn",
                "chelsea": "duplicate_id"}


@pytest.mark.parametrize("form", ["folder", "glob", "file"])
def test_a_file_a_glob_or_a_folder_reads_the_good_rows_with_their_bytes_unchanged(parquet_dir, sample_rows, form):
    path = {"folder": str(parquet_dir), "glob": str(parquet_dir / "train-*.parquet"),
            "file": str(parquet_dir / "train-00000.parquet")}[form]
    records, _ = load_records(DataConfig(path=path))
    want = sample_rows if form != "file" else sample_rows[:4]
    assert [r.id for r in records] == [r["id"] for r in want]
    assert [r.images[0].read_bytes() for r in records] == [r["image_bytes"] for r in want]
    assert records[0].conversations == want[0]["conversations"]
    assert records[0].images[0].name == want[0]["image_relpath"]


def test_every_bad_row_is_reported_with_id_and_kind(parquet_dir, caplog):
    with caplog.at_level(logging.WARNING):
        records, bad = load_records(DataConfig(path=str(parquet_dir)))
    assert len(records) == 7
    assert {b.id: b.kind for b in bad} == EXPECTED_BAD
    assert [b.source_index for b in bad] == sorted(b.source_index for b in bad)
    by_id = {b.id: b for b in bad}
    assert "train-00000.parquet" in by_id["truncated"].reason and "t.jpg" in by_id["truncated"].reason


def test_error_mode_names_the_bad_row(parquet_dir):
    with pytest.raises(BadRecordError, match=r"id='truncated'.*train-00000.parquet"):
        load_records(DataConfig(path=str(parquet_dir), on_bad_record="error"))


@pytest.mark.parametrize("column", ["id", "image", "image_relpath", "conversations"])
def test_a_missing_column_is_an_error_naming_file_and_column(tmp_path, sample_rows, column):
    path = write_covt_parquet(tmp_path / "broken.parquet", sample_rows, drop_column=column)
    with pytest.raises(ParquetSchemaError, match=rf"broken.parquet has no column '{column}'"):
        load_records(DataConfig(path=str(path)))


def test_no_parquet_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        load_records(DataConfig(path=str(tmp_path / "none-*.parquet")))


def test_subset_is_seeded_in_source_order_and_replaces_bad_rows(parquet_dir):
    full, _ = load_records(DataConfig(path=str(parquet_dir)))
    pick = [load_records(DataConfig(path=str(parquet_dir), subset=SubsetConfig(size=4, seed=s)))[0] for s in (0, 0, 1)]
    ids = [[r.id for r in recs] for recs in pick]
    _, met = load_records(DataConfig(path=str(parquet_dir), subset=SubsetConfig(size=4, seed=0)))
    assert met  # seed 0's walk meets bad rows (and replaces them)
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert all(len(i) == 4 and set(i) <= {r.id for r in full} for i in ids)  # bad rows met are replaced
    assert [r.index for r in pick[0]] == [0, 1, 2, 3]
    assert [r.source_index for r in pick[0]] == sorted(r.source_index for r in pick[0])


def test_subset_larger_than_the_good_records_keeps_them_all(parquet_dir):
    records, bad = load_records(DataConfig(path=str(parquet_dir), subset=SubsetConfig(size=100)))
    assert len(records) == 7 and len(bad) == len(EXPECTED_BAD)


def test_subset_of_json_and_the_manifest_records_it(tmp_path, sample_data_cfg):
    sample_data_cfg.subset = SubsetConfig(size=3, seed=5)
    cache = write_synthetic_cache(tmp_path / "cache", sample_data_cfg, ["dino"], shard_size=2,
                                  subset={"size": 3, "seed": 5})
    c = Cache(cache)
    assert len(c) == 3 and c.manifest["subset"] == {"size": 3, "seed": 5}
    chosen = load_records(sample_data_cfg)[0]
    assert [c.sample_entry(i)["id"] for i in range(3)] == [r.id for r in chosen]


def test_a_parquet_cache_holds_the_original_image_bytes(tmp_path, parquet_dir, sample_rows):
    cache = write_synthetic_cache(tmp_path / "cache", DataConfig(path=str(parquet_dir)), ["pidinet"], shard_size=3)
    c = Cache(cache)
    assert [c.sample(i)["image_bytes"][0] for i in range(len(c))] == [r["image_bytes"] for r in sample_rows]
