"""CPU cost of ``CacheWriter.write_targets`` per image at real target sizes, per anchor and storage variant.

    python bench/bench_cache_write.py                           # this checkout, every compression variant
    python bench/bench_cache_write.py --baseline /tmp/old-checkout   # adds a column for another checkout's writer
    python bench/bench_cache_write.py --images 4 --anchors depth     # smaller

Targets are seeded random data of the real shapes (SAM ViT-H: embedding
256x64x64 + 8 masks 256x256; Depth Anything V2 ViT-L: 4x1369x1024 features +
256x256 map; DINOv2 ViT-L/14: 1025x1024): float features are normal with a
per-channel log-normal scale (bf16 compresses about as well as real network
features), masks are smooth blobs (real masks are regions, not noise). Each
variant writes one shard of ``--images`` samples into a fresh cache; the
table gives, per image, the wall time and the CPU time of the whole process
(every thread, zarr's included) of the best of ``--repeat`` writes, and the
bytes on disk. ``parallel`` writes the three anchors of one shard at once from
three threads, as the precompute driver does. A ``--baseline`` checkout runs
in a subprocess with only its default settings (older writers take no
compression argument).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# the writer under test: this checkout, or the one --baseline names (its subprocess gets BENCH_REPO)
sys.path.insert(0, os.environ.get("BENCH_REPO", str(Path(__file__).resolve().parents[1])))

REAL_DIMS = {
    "sam": {"embed_dim": 256, "embed_h": 64, "embed_w": 64, "max_masks": 8, "mask_h": 256, "mask_w": 256},
    "depth": {"layers": 4, "patches": 1369, "dim": 1024, "map_h": 256, "map_w": 256},
    "dino": {"tokens": 1025, "dim": 1024},
}
VARIANTS = {  # name -> CacheWriter(compression=...)
    "default": None,
    "float none": {"float": "none"},
    "float zstd-1": {"float": "zstd-1"},
    "float zstd-3": {"float": "zstd-3"},
}


def fake_targets(anchor: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    from covt.anchors import array_shape, get_anchor

    rng = np.random.default_rng([seed, len(anchor)])
    dims = REAL_DIMS[anchor]
    out = {}
    for arr in get_anchor(anchor).arrays:
        shape = (n, *array_shape(anchor, arr.name, dims))
        if arr.kind == "float":
            channel_scale = rng.lognormal(0.0, 1.0, size=shape[-1]).astype(np.float32)
            out[arr.name] = rng.standard_normal(shape, dtype=np.float32) * channel_scale
        elif arr.kind == "mask":
            low = rng.standard_normal((*shape[:-2], shape[-2] // 16, shape[-1] // 16), dtype=np.float32)
            smooth = low.repeat(16, axis=-2).repeat(16, axis=-1)
            out[arr.name] = smooth > 0.8
        else:
            out[arr.name] = rng.integers(1, dims["max_masks"] + 1, size=shape).astype(np.int32)
    return out


def _writer(tmp: Path, n: int, variant):
    from shards.samples import Record
    from shards.writer import CacheWriter

    records = [Record(i, i, f"bench{i}", [Path(f"img{i}.jpg")], []) for i in range(n)]
    kwargs = {} if variant is None else {"compression": variant}
    return CacheWriter(tmp, records, n, **kwargs)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "targets.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")


def time_variant(anchors: list[str], targets: dict, n: int, variant, repeat: int) -> dict[str, dict]:
    rows = {}
    for anchor in anchors + (["parallel"] if len(anchors) > 1 else []):
        best = None
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
                writer = _writer(Path(tmp), n, variant)
                todo = anchors if anchor == "parallel" else [anchor]
                for a in todo:
                    writer.declare_anchor(a, REAL_DIMS[a], {"bench": True}, [])
                wall, cpu = time.perf_counter(), time.process_time()
                if anchor == "parallel":
                    with ThreadPoolExecutor(len(todo)) as pool:
                        for f in [pool.submit(writer.write_targets, 0, a, targets[a]) for a in todo]:
                            f.result()
                else:
                    writer.write_targets(0, anchor, targets[anchor])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                row = {"wall_ms": 1e3 * wall / n, "cpu_ms": 1e3 * cpu / n, "disk_mb": _disk_bytes(Path(tmp)) / n / 1e6}
            if best is None or row["cpu_ms"] < best["cpu_ms"]:
                best = row
        rows[anchor] = best
    return rows


def run_here(anchors: list[str], n: int, repeat: int, variants: list[str]) -> dict:
    targets = {a: fake_targets(a, n) for a in anchors}
    raw = {a: sum(v.nbytes for v in t.values()) / n / 1e6 for a, t in targets.items()}
    results = {}
    for name in variants:
        print(f"  timing {name} ...", file=sys.stderr, flush=True)
        results[name] = time_variant(anchors, targets, n, VARIANTS[name], repeat)
    return {"raw_mb": raw, "variants": results}


def table(anchors: list[str], columns: dict[str, dict], raw: dict[str, float]) -> str:
    rows = anchors + (["parallel"] if len(anchors) > 1 else [])
    head = ["anchor", "raw MB"] + [f"{c}: cpu ms / wall ms / disk MB" for c in columns]
    lines = [head]
    for a in rows:
        cells = [a, f"{raw[a]:.1f}" if a in raw else "all"]
        for col in columns.values():
            r = col.get(a)
            cells.append("-" if r is None else f"{r['cpu_ms']:7.1f} / {r['wall_ms']:7.1f} / {r['disk_mb']:6.2f}")
        lines.append(cells)
    total = ["sum of the three", f"{sum(raw.values()):.1f}"]
    for col in columns.values():
        if all(a in col for a in anchors):
            cpu, wall = sum(col[a]["cpu_ms"] for a in anchors), sum(col[a]["wall_ms"] for a in anchors)
            total.append(f"{cpu:7.1f} / {wall:7.1f}"
                         f" / {sum(col[a]['disk_mb'] for a in anchors):6.2f}")
        else:
            total.append("-")
    lines.append(total)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default="sam,depth,dino")
    ap.add_argument("--images", type=int, default=8, help="samples in the shard written (default 8)")
    ap.add_argument("--repeat", type=int, default=2, help="writes per variant; the fastest counts")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {list(VARIANTS)}")
    ap.add_argument("--baseline", type=Path, help="another checkout whose writer gets a column (default settings)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only (used for --baseline)")
    a = ap.parse_args(argv)
    anchors = a.anchors.split(",")
    columns = {}
    if a.baseline is not None:
        cmd = [sys.executable, __file__, "--json", "--anchors", a.anchors, "--images", str(a.images),
               "--repeat", str(a.repeat), "--variants", "default"]
        env = {**os.environ, "BENCH_REPO": str(a.baseline.resolve())}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        columns[f"baseline ({a.baseline.name})"] = json.loads(out)["variants"]["default"]
    if a.json:
        print(json.dumps(run_here(anchors, a.images, a.repeat, a.variants.split(","))))
        return 0
    here = run_here(anchors, a.images, a.repeat, a.variants.split(","))
    columns.update(here["variants"])
    print(f"CacheWriter.write_targets per image, one shard of {a.images} images, {os.cpu_count()} CPUs "
          f"(cpu = process CPU time over all threads)")
    print(table(anchors, columns, here["raw_mb"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
