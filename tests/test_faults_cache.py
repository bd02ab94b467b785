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
    dataset = StreamingDataset(cache, ["depth"], seed=0)
    with pytest.raises(DamagedSampleError, match=rf"shard-000001.samples.json: holds 3 samples, the manifest "
                                                 rf"counts {3 + delta} for this shard"):
        list(dataset)
    assert inspect_main([str(cache), "--verify"]) == 1
    assert f"holds 3 samples, the manifest counts {3 + delta}" in capsys.readouterr().out
