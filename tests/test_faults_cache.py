"""Issue 23: what the trainer reads from a cache is checked where it is read (manifest counts included)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shards import layout
from shards.inspect import main as inspect_main
from shards.integrity import DamagedSampleError
from shards.reader import Cache, CacheError, StreamingDataset


@pytest.fixture
def cache(tmp_path, synthetic_cache):
    return Path(shutil.copytree(synthetic_cache, tmp_path / "cache"))


def resign(cache_dir: Path, edit) -> None:
    """Edit the manifest and recompute its self-checksum, as a careful hand edit would."""
    manifest = json.loads((cache_dir / layout.MANIFEST).read_text())
    edit(manifest)
    manifest[layout.MANIFEST_CHECKSUM] = layout.manifest_checksum(manifest)
    (cache_dir / layout.MANIFEST).write_text(layout.dumps(manifest))


def test_a_manifest_re_signed_with_a_larger_sample_count_is_refused_at_open(cache):
    resign(cache, lambda m: m.update(num_samples=m["num_samples"] + 3))
    with pytest.raises(CacheError, match=r"manifest.json: shard counts add to 7 samples in 2 shards, expected 10"):
        Cache(cache)


@pytest.mark.parametrize("delta", [1, -1], ids=["larger", "smaller"])
def test_a_shard_count_re_signed_to_match_is_named_when_the_shard_is_read(cache, capsys, delta):
    def edit(m):
        m["shards"][-1]["count"] += delta
        m["num_samples"] += delta

    resign(cache, edit)
    dataset = StreamingDataset(cache, ["depth"], seed=0, epochs=1)
    with pytest.raises(DamagedSampleError, match=rf"shard-000001.samples.json: holds 3 samples, the manifest "
                                                 rf"counts {3 + delta} for this shard"):
        list(dataset)
    assert inspect_main([str(cache), "--verify"]) == 1
    assert f"holds 3 samples, the manifest counts {3 + delta}" in capsys.readouterr().out


def test_a_damaged_sample_skipped_in_every_epoch_counts_once(cache, tmp_path):
    from types import SimpleNamespace

    from covt.config import Config
    from trainer.metrics import MetricsLogger

    entry = json.loads((cache / layout.samples_progress_name(0)).read_text())["samples"][2]
    data = bytearray((cache / layout.tar_name(0)).read_bytes())
    data[entry["members"][1]["offset"] + 10] ^= 1
    (cache / layout.tar_name(0)).write_bytes(bytes(data))
    samples = list(StreamingDataset(cache, ["depth"], seed=0, epochs=3, on_damaged="skip"))
    problems = [p for s in samples for p in s["damaged_skipped"]]
    assert len(problems) == 3  # passed over once per epoch
    log = MetricsLogger(Config(), tmp_path / "run", 0, 3, 0, samples_per_step=1)
    at = SimpleNamespace(name="understanding", stage_index=0, run_index=0, anchor_losses_on=True)
    for step in range(3):
        log.damaged_samples(problems[step:step + 1], step)
        log.step(step + 1, at, {"loss": 1.0}, {"lr": 1e-3}, every=1)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["damaged_samples_skipped"] for r in rows] == [1, 1, 1]


def test_a_killed_anchors_run_leaves_nothing_after_the_rerun_and_says_to_rerun_it(tmp_path):
    from covt.config import DataConfig
    from precompute.records import load_records
    from shards.storage import open_writer
    from tests.synthetic import DEFAULT_DIMS, write_synthetic_cache

    repo = Path(__file__).resolve().parents[1]
    data = DataConfig(path=str(repo / "data/sample/conversations.json"), image_folder=str(repo / "data/sample/images"))
    cache = write_synthetic_cache(tmp_path / "cache", data, ["depth"], shard_size=4)
    with pytest.raises(CacheError, match=r"anchor 'pidinet' is not in the cache .*`python -m precompute --config "
                                         r"YOUR_CONFIG --anchors pidinet`"):
        Cache(cache).dims("pidinet")
    # `--anchors pidinet` killed: its group half created, its declaration made, no targets
    leftover = cache / layout.TARGETS_DIR / ".pidinet.0a1b2c.tmp"
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{}")
    records, bad = load_records(data)
    writer = open_writer(cache, records, 4, bad, "bf16", {})
    writer.declare_anchor("pidinet", DEFAULT_DIMS["pidinet"], {"synthetic": True, "seed": 0}, [])
    with pytest.raises(RuntimeError, match=r"anchor 'pidinet' has no committed targets .*rerun `python -m "
                                           r"precompute --config YOUR_CONFIG --anchors pidinet`"):
        writer.finalize()
    write_synthetic_cache(cache, data, ["depth", "pidinet"], shard_size=4)  # the rerun finishes it
    assert not leftover.exists() and not list(cache.rglob(".*.tmp"))
    assert Cache(cache).anchors == ["depth", "pidinet"]


def test_a_cache_dir_that_is_a_file_is_named(tmp_path):
    from covt.config import load_config
    from precompute.run import precompute

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(CacheError, match=r"cache is a file, not a cache folder"):
        Cache(tmp_path / "cache")
    cfg = load_config(repo / "configs/tiny.yaml", [f"cache.dir={tmp_path / 'cache'}", "anchors=[pidinet]"])
    with pytest.raises(NotADirectoryError, match=r"cache is a file; a folder belongs there"):
        precompute(cfg)


def test_a_rerun_on_a_read_only_cache_says_so(cache, monkeypatch):
    """As a cache mounted read-only: creating the lock file fails with EROFS (root ignores chmod here)."""
    import errno

    from covt.config import load_config
    from precompute.run import precompute

    def read_only(path, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(layout, "create_exclusive_json", read_only)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/tiny.yaml", [f"cache.dir={cache}", "anchors=[pidinet]"])
    with pytest.raises(PermissionError, match=r"cannot create the lock .*writer.lock: Read-only file system\. The "
                                              r"folder is read-only here; a finished cache needs no rerun"):
        precompute(cfg)
