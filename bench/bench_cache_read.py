"""Reading a cache: what the integrity checks cost per sample, and samples/s one rank streams from a local
folder and from an S3 server.

    python bench/bench_cache_read.py                       # real target sizes (SAM ViT-H, depth ViT-L, DINOv2 ViT-L)
    python bench/bench_cache_read.py --small               # tiny sizes: a quick smoke run
    python bench/bench_cache_read.py --verify on            # one mode only
    python bench/bench_cache_read.py --s3 --samples 256 --shard-size 32 --workers 8   # + streaming, local vs S3

Writes one cache of ``--samples`` records (the seven bundled photos, repeated) with seeded random targets
of the real shapes (``bench_cache_write.fake_targets``, ``--codec``), then reads every sample through
``shards.reader.Cache.sample`` as the training stream does, ``--verify off`` (no checks) and ``on``
(sha256 of each tar member, crc32c of each stored target array, zarr shard files present, commit records
against the manifest once per shard), alternating, best of ``--repeat`` passes over a warm page cache.
The difference is what the checks cost per sample, to compare with a training step (~970 ms for the 7B
CoVT step, README).

``--s3`` also measures the training stream itself (``StreamingDataset`` in a DataLoader of ``--workers``
processes, checks on, one pass): from the local folder, then from the same files uploaded to an S3 server
(moto's server mode in its own process on 127.0.0.1, read through s3fs: the code path of a real bucket,
not its bandwidth or latency), once into an empty local copy (every download included, the prefetch
ahead of the stream) and once from the warm copy. The target is 10x what one GPU consumes in training
(7.2 samples/s on an H100, BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cache_write import REAL_DIMS, fake_targets  # noqa: E402

ONE_GPU_SAMPLES_PER_S = 7.2  # the 7B step on one H100 (BENCHMARKS.md, issue 9): the target is 10x this


def bench_records(tmp: Path, samples: int):
    """``samples`` records: the bundled photos (and their conversations) repeated under new ids."""
    from covt.config import DataConfig
    from precompute.records import load_records

    base = json.loads((REPO / "data/sample/conversations.json").read_text())
    rows = [{**base[i % len(base)], "id": f"{base[i % len(base)]['id']}-{i}"} for i in range(samples)]
    (tmp / "records.json").write_text(json.dumps(rows))
    return load_records(DataConfig(path=str(tmp / "records.json"), image_folder=str(REPO / "data/sample/images")))


def write_cache(root: Path, anchors: list[str], small: bool, samples: int = 7, shard_size: int = 64,
                codec: str = "bf16") -> Path:
    from shards.writer import CacheWriter
    from tests.synthetic import DEFAULT_DIMS, synthetic_shard_targets

    dims = DEFAULT_DIMS if small else REAL_DIMS
    root.mkdir(parents=True)
    records, bad = bench_records(root.parent, samples)
    writer = CacheWriter(root, records, shard_size, bad, default_codec=codec)
    for anchor in anchors:
        writer.declare_anchor(anchor, dims[anchor], {"bench": True}, [])
    for shard in range(writer.num_shards):
        writer.write_samples(shard)
        recs = writer.shard_records(shard)
        for anchor in anchors:  # one shard's targets in memory at a time
            targets = (synthetic_shard_targets(anchor, dims[anchor], recs, seed=shard) if small
                       else fake_targets(anchor, len(recs), seed=shard))
            writer.write_targets(shard, anchor, targets)
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


def stream_rate(location: str | Path, anchors: list[str], workers: int, local_dir: Path | None = None) -> float:
    """samples/s of one pass of one rank's training stream in a DataLoader of ``workers`` processes."""
    import torch

    from shards.reader import StreamingDataset

    start = time.perf_counter()
    stream = StreamingDataset(location, anchors, seed=0, epochs=1, cache_kwargs={"local_dir": local_dir})
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - start)


def start_s3() -> subprocess.Popen:
    """moto's S3 server in its own process on a free port of 127.0.0.1 (the reader's GIL stays its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's S3 server did not start")


def server_ceiling(fs, tmp: Path, samples: int) -> float:
    """Samples/s the server itself gives: every object of the cache fetched by s3fs's concurrent ``get``,
    nothing decoded or checked (the bound on any reader of this server)."""
    start = time.perf_counter()
    fs.get("bench/cache", str(tmp / "raw"), recursive=True)
    return samples / (time.perf_counter() - start)


def bench_streams(cache_dir: Path, tmp: Path, anchors: list[str], workers: int) -> dict[str, float]:
    """samples/s of the stream from the local folder, and from S3 into an empty and then a warm local copy."""
    import fsspec

    from shards.reader import Cache

    rates = {"local folder": stream_rate(cache_dir, anchors, workers)}
    server = start_s3()
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(str(cache_dir), "bench/cache", recursive=True)  # the same files, object for file
        rates["S3 server's ceiling"] = server_ceiling(fs, tmp, len(Cache(cache_dir)))
        rates["S3, empty local copy"] = stream_rate("s3://bench/cache", anchors, workers, tmp / "copy")
        rates["S3, warm local copy"] = stream_rate("s3://bench/cache", anchors, workers, tmp / "copy")
    finally:
        server.kill()
        server.wait()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anchors", default="sam,depth,dino")
    p.add_argument("--small", action="store_true", help="tiny target sizes (smoke run)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--verify", choices=["on", "off", "both"], default="both")
    p.add_argument("--samples", type=int, default=7, help="records in the cache (the 7 photos, repeated)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--codec", default="bf16", help="cache.codec of the float targets (auto: the small codecs)")
    p.add_argument("--s3", action="store_true", help="also stream the cache locally and from an S3 server (moto)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the streams (--s3)")
    a = p.parse_args()
    anchors = [x for x in a.anchors.split(",") if x]
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.verify]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        cache_dir = write_cache(Path(tmp) / "cache", anchors, a.small, a.samples, a.shard_size, a.codec)
        best = {m: float("inf") for m in modes}
        time_reads(cache_dir, False, anchors)  # warm the page cache
        for _ in range(a.repeat):
            for mode in modes:
                best[mode] = min(best[mode], time_reads(cache_dir, mode, anchors))
        from shards.reader import Cache

        sample = Cache(cache_dir).sample(0, anchors)
        target_mb = sum(t.numel() * t.element_size() for arrs in sample["targets"].values() for t in arrs.values())
        stored_mb = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / a.samples / 1e6
        print(f"anchors {anchors}, {'tiny' if a.small else 'real'} sizes, {a.samples} samples, codec {a.codec}: "
              f"{target_mb / 1e6:.1f} MB of decoded targets, {stored_mb:.1f} MB stored per sample, "
              f"best of {a.repeat}")
        for mode in modes:
            print(f"  verify {'on ' if mode else 'off'}: {best[mode] * 1e3:8.2f} ms/sample")
        if len(modes) == 2:
            extra = best[True] - best[False]
            print(f"  checks cost {extra * 1e3:.2f} ms/sample ({100 * extra / best[False]:.0f}% of a read; "
                  f"{100 * extra / 0.9728:.2f}% of a 972.8 ms 7B step at batch 1)")
        if a.s3:
            print(f"one rank's stream, {a.workers} DataLoader workers, checks on, shards of {a.shard_size}:")
            for name, rate in bench_streams(cache_dir, Path(tmp), anchors, a.workers).items():
                print(f"  {name:22s} {rate:8.1f} samples/s  ({rate / ONE_GPU_SAMPLES_PER_S:5.1f}x what one H100 "
                      f"trains on, {rate * stored_mb:7.1f} MB/s)")


if __name__ == "__main__":
    main()
