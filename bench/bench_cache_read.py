"""Cost of reading one training sample from a cache, with and without its integrity checks.

    python bench/bench_cache_read.py                       # real target sizes (SAM ViT-H, depth ViT-L, DINOv2 ViT-L)
    python bench/bench_cache_read.py --small               # tiny sizes: a quick smoke run
    python bench/bench_cache_read.py --verify on            # one mode only

Writes one cache of the seven bundled photos with seeded random targets of the real shapes
(``bench_cache_write.fake_targets``, default codecs and compression), then reads every sample
through ``shards.reader.Cache.sample`` as the training stream does, ``--verify off`` (no checks)
and ``on`` (sha256 of each tar member, crc32c of each stored target array, zarr shard files
present, commit records against the manifest once per shard), alternating, best of
``--repeat`` passes over a warm page cache. The difference is what the checks cost per sample,
to compare with a training step (~970 ms for the 7B CoVT step, README).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cache_write import REAL_DIMS, fake_targets  # noqa: E402


def write_cache(root: Path, anchors: list[str], small: bool) -> Path:
    from shards.config import DataConfig
    from shards.records import load_records
    from shards.testing import DEFAULT_DIMS
    from shards.writer import CacheWriter

    dims = DEFAULT_DIMS if small else REAL_DIMS
    data = DataConfig(path=str(REPO / "data/sample/conversations.json"), image_folder=str(REPO / "data/sample/images"))
    records, bad = load_records(data)
    writer = CacheWriter(root, records, len(records), bad)
    writer.write_samples(0)
    for anchor in anchors:
        writer.declare_anchor(anchor, dims[anchor], {"bench": True}, [])
        if small:
            from shards.testing import synthetic_shard_targets

            targets = synthetic_shard_targets(anchor, dims[anchor], records, seed=0)
        else:
            targets = fake_targets(anchor, len(records))
        writer.write_targets(0, anchor, targets)
    writer.finalize()
    return root


def time_reads(cache_dir: Path, verify: bool, anchors: list[str]) -> float:
    """Seconds per sample of one pass over every sample (a fresh Cache: commit records reread too)."""
    from shards.reader import Cache

    cache = Cache(cache_dir, verify=verify)
    start = time.perf_counter()
    for index in range(cache.num_samples):
        cache.sample(index, anchors)
    seconds = (time.perf_counter() - start) / cache.num_samples
    cache.close()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anchors", default="sam,depth,dino")
    p.add_argument("--small", action="store_true", help="tiny target sizes (smoke run)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--verify", choices=["on", "off", "both"], default="both")
    a = p.parse_args()
    anchors = [x for x in a.anchors.split(",") if x]
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.verify]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        cache_dir = write_cache(Path(tmp) / "cache", anchors, a.small)
        best = {m: float("inf") for m in modes}
        time_reads(cache_dir, False, anchors)  # warm the page cache
        for _ in range(a.repeat):
            for mode in modes:
                best[mode] = min(best[mode], time_reads(cache_dir, mode, anchors))
        from shards.reader import Cache

        sample = Cache(cache_dir).sample(0, anchors)
        target_mb = sum(t.numel() * t.element_size() for arrs in sample["targets"].values() for t in arrs.values())
    print(f"anchors {anchors}, {'tiny' if a.small else 'real'} sizes, {target_mb / 1e6:.1f} MB of decoded targets "
          f"per sample, best of {a.repeat}")
    for mode in modes:
        print(f"  verify {'on ' if mode else 'off'}: {best[mode] * 1e3:8.2f} ms/sample")
    if len(modes) == 2:
        extra = best[True] - best[False]
        print(f"  checks cost {extra * 1e3:.2f} ms/sample ({100 * extra / best[False]:.0f}% of a read; "
              f"{100 * extra / 0.9728:.2f}% of a 972.8 ms 7B step at batch 1)")


if __name__ == "__main__":
    main()
