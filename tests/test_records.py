import json
import logging
import shutil

import pytest

from covt.config import DataConfig
from precompute.records import BadRecordError, load_records


def conv(first="<image>\nWhat is this?", answer="A photo."):
    return [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]


@pytest.fixture
def dataset(tmp_path, repo_root):
    """A LLaVA JSON with good records of every image form and one bad record of every kind."""
    images = tmp_path / "images"
    images.mkdir()
    src = repo_root / "data" / "sample" / "images"
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(src / name, images / name)
    data = (src / "astronaut.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (images / "garbage.jpg").write_bytes(b"this is not an image at all")
    entries = [
        {"id": "rel", "image": "chelsea.jpg", "conversations": conv()},                           # 0 good
        {"id": "abs", "image": str(images / "coffee.jpg"), "conversations": conv()},               # 1 good
        {"id": "two", "image": ["chelsea.jpg", "rocket.jpg"],
         "conversations": conv("<image>\n<image>\nCompare them.")},                                 # 2 good
        {"image": "rocket.jpg", "conversations": conv()},                                          # 3 good, no id
        {"id": "noimgtok", "image": "chelsea.jpg", "conversations": conv("What is this?")},        # 4
        {"id": "gptfirst", "image": "chelsea.jpg",
         "conversations": [{"from": "gpt", "value": "<image> hi"}, {"from": "human", "value": "x"}]},  # 5
        {"id": "empty", "image": "chelsea.jpg", "conversations": conv(answer="   ")},               # 6
        {"id": "rel", "image": "coffee.jpg", "conversations": conv()},                             # 7 duplicate
        {"id": "missing", "image": "nowhere.jpg", "conversations": conv()},                        # 8
        {"id": "truncated", "image": "truncated.jpg", "conversations": conv()},                    # 9
        {"id": "garbage", "image": "garbage.jpg", "conversations": conv()},                        # 10
        {"id": "count", "image": ["chelsea.jpg", "rocket.jpg"], "conversations": conv()},          # 11
        {"id": "noanswer", "image": "chelsea.jpg", "conversations": conv()[:1]},                   # 12
        {"id": "noimage", "conversations": conv()},                                                # 13
        {"id": "latetok", "image": "chelsea.jpg",
         "conversations": conv() + conv("again <image>")},                                         # 14
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    return DataConfig(path=str(path), image_folder=str(images), on_bad_record="skip")


EXPECTED_BAD = {
    "noimgtok": "no_image_token", "gptfirst": "role_order", "empty": "empty_turn", "rel": "duplicate_id",
    "missing": "image_missing", "truncated": "image_unreadable", "garbage": "image_unreadable",
    "count": "image_count", "noanswer": "role_order", "noimage": "no_image", "latetok": "image_token_misplaced",
}


def test_good_records_accept_relative_absolute_and_list_images(dataset):
    records, _ = load_records(dataset)
    assert [r.id for r in records] == ["rel", "abs", "two", "3"]
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.source_index for r in records] == [0, 1, 2, 3]
    assert [len(r.images) for r in records] == [1, 1, 2, 1]
    assert all(p.is_file() for r in records for p in r.images)
    assert records[0].conversations[0]["from"] == "human"


def test_every_bad_record_kind_is_reported_with_id_and_reason(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        _, bad = load_records(dataset)
    assert {b.id: b.kind for b in bad} == EXPECTED_BAD
    by_id = {b.id: b for b in bad}
    assert by_id["rel"].source_index == 7 and "entry 0" in by_id["rel"].reason
    assert "nowhere.jpg" in by_id["missing"].reason
    assert "truncated.jpg" in by_id["truncated"].reason
    assert "turn 1" in by_id["empty"].reason
    for b in bad:  # each one logged by id and reason
        assert any(b.id in r.getMessage() and b.reason in r.getMessage() for r in caplog.records), b.id


def test_error_mode_stops_at_the_first_bad_record_naming_it(dataset):
    dataset.on_bad_record = "error"
    with pytest.raises(BadRecordError, match=r"id='noimgtok'.*no <image>"):
        load_records(dataset)


def test_truncated_image_is_fatal_in_error_mode(dataset):
    entries = json.loads(open(dataset.path).read())
    json.dump([entries[9]], open(dataset.path, "w"))
    dataset.on_bad_record = "error"
    with pytest.raises(BadRecordError, match="truncated"):
        load_records(dataset)


def test_limit_reads_only_the_first_records(dataset):
    dataset.limit = 5
    records, bad = load_records(dataset)
    assert [r.id for r in records] == ["rel", "abs", "two", "3"]
    assert [b.id for b in bad] == ["noimgtok"]


def test_bundled_sample_dataset_is_all_good(sample_data_cfg):
    records, bad = load_records(sample_data_cfg)
    assert len(records) == 7 and bad == []
