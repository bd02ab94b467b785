"""Where things live inside a cache directory, and the small file helpers writer and reader share.

```
CACHE/
  manifest.json                      written last by finalize(); readers start here
  samples/shard-000000.tar           webdataset tar: KEY.json + KEY.img0.jpg ... per sample
  targets.zarr/<anchor>/<array>      zarr v3, leading dim = sample index, one zarr shard per tar shard
  decoders/                          frozen pieces the training losses need
  progress/records.json              which records this cache holds (guards against mixing datasets)
  progress/anchor-<anchor>.json      an anchor's declaration: dims, fingerprint, codecs
  progress/shard-000000.samples.json commit record of a tar shard (offsets, sizes, sha256)
  progress/shard-000000.<anchor>.json commit record of an anchor's targets for a shard
  writer.lock                        while a precompute writes (shards.lock): its host, pid, start time
  validation/                        with data.validation: the held-out samples, a cache of their own
```
A shard part counts as written only once its commit record exists; commit
records are written last and atomically.

Checksums: sha256 for the tars and their members (small: images and JSON);
crc32c (``TARGET_CHECKSUM``, ~10 GB/s against sha256's ~1) for target
arrays, whose gigabytes would otherwise make hashing cost more than writing.
Each target commit record names its algorithm.

Schema history: ``covt-shards/1`` hashed targets with sha256 and zstd-3
compressed every array; ``covt-shards/2`` has crc32c target checksums and a
per-array ``compression`` in the declarations.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np

from covt.fs import atomic_write, sha256_file

SCHEMA = "covt-shards/2"
TARGET_CHECKSUM = "crc32c"
MANIFEST = "manifest.json"
SAMPLES_DIR = "samples"
TARGETS_DIR = "targets.zarr"
DECODERS_DIR = "decoders"
PROGRESS_DIR = "progress"
LOCK = "writer.lock"  # shards.lock: the precompute writing this cache
MANIFEST_CHECKSUM = "manifest_sha256"  # the manifest's checksum of itself (every other key)
VALIDATION_DIR = "validation"


def validation_cache_dir(cache_dir: str | Path) -> str | Path:
    """Where the held-out samples of ``data.validation`` are cached: a complete cache inside the training one
    (a folder, or for an fsspec URL such as ``s3://bucket/cache`` the URL ``s3://bucket/cache/validation``)."""
    if "://" in str(cache_dir):  # Path would fold the URL's '//'
        return f"{str(cache_dir).rstrip('/')}/{VALIDATION_DIR}"
    return Path(cache_dir) / VALIDATION_DIR


def sample_key(index: int) -> str:
    return f"{index:09d}"


def tar_name(shard_id: int) -> str:
    return f"{SAMPLES_DIR}/shard-{shard_id:06d}.tar"


def samples_progress_name(shard_id: int) -> str:
    return f"{PROGRESS_DIR}/shard-{shard_id:06d}.samples.json"


def targets_progress_name(shard_id: int, anchor: str) -> str:
    return f"{PROGRESS_DIR}/shard-{shard_id:06d}.{anchor}.json"


def declaration_name(anchor: str) -> str:
    return f"{PROGRESS_DIR}/anchor-{anchor}.json"


TAR_FORMAT = tarfile.USTAR_FORMAT
TAR_ENCODING = "utf-8"


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    """Header of a sample tar member: fixed owner, mode and time, so rewriting a shard gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def tar_header(name: str, size: int) -> bytes:
    """The header bytes the writer puts before a member's payload (``verify`` compares them)."""
    return tar_member_info(name, size).tobuf(TAR_FORMAT, TAR_ENCODING, "surrogateescape")


def dumps(obj) -> str:
    """The one JSON spelling used for every file of a cache (stable bytes)."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _crc32c(data) -> str:
    if isinstance(data, np.ndarray):  # hashed in place: no copy of the buffer
        data = np.ascontiguousarray(data)
    return f"{google_crc32c.value(data):08x}"


def _sha256(data) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).data
    return hashlib.sha256(data).hexdigest()


CHECKSUMS = {"crc32c": _crc32c, "sha256": _sha256}


def checksum(data: bytes | np.ndarray, algorithm: str = TARGET_CHECKSUM) -> str:
    """Hex checksum of ``data`` (bytes, or an array's bytes in C order)."""
    try:
        return CHECKSUMS[algorithm](data)
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {list(CHECKSUMS)})") from None


def checksum_file(path: Path, algorithm: str = TARGET_CHECKSUM, block: int = 8 << 20) -> str:
    if algorithm == "sha256":
        return sha256_file(path, block)
    if algorithm != "crc32c":
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {list(CHECKSUMS)})")
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, dumps(obj).encode())


def create_exclusive_json(path: Path, obj) -> dict:
    """Create ``path`` holding ``obj`` unless it exists (another rank won); return what the file holds."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    tmp.write_text(dumps(obj))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(path.read_text())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest without its own checksum key (``finalize`` stores it, readers compare)."""
    return sha256_bytes(dumps({k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}).encode())


def manifest_problem(manifest: dict) -> str | None:
    """Why the manifest cannot be trusted (edited after it was written), or None."""
    stored = manifest.get(MANIFEST_CHECKSUM)
    if stored is None:
        return f"{MANIFEST} has no self-checksum ({MANIFEST_CHECKSUM}); rewrite it by rerunning precompute"
    if stored != manifest_checksum(manifest):
        return (f"{MANIFEST} was edited after precompute wrote it (its {MANIFEST_CHECKSUM} does not match its "
                f"contents); restore it or rerun precompute into a new cache.dir")
    return None


def count_problem(manifest: dict) -> str | None:
    """Why the manifest's sample and shard counts disagree with each other (a re-signed edit), or None."""
    shards = manifest.get("shards", [])
    counted = sum(s["count"] for s in shards)
    if counted != manifest.get("num_samples") or len(shards) != manifest.get("num_shards"):
        return (f"{MANIFEST}: shard counts add to {counted} samples in {len(shards)} shards, expected "
                f"{manifest.get('num_samples')} in {manifest.get('num_shards')}")
    return None
