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
```
A shard part counts as written only once its commit record exists; commit
records are written last and atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SCHEMA = "covt-shards/1"
MANIFEST = "manifest.json"
SAMPLES_DIR = "samples"
TARGETS_DIR = "targets.zarr"
DECODERS_DIR = "decoders"
PROGRESS_DIR = "progress"


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


def dumps(obj) -> str:
    """The one JSON spelling used for every file of a cache (stable bytes)."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so readers see either the old file or the whole new one.

    The temporary name is fixed per target, so a rerun after a crash overwrites
    the leftover instead of accumulating them (each file has a single writer).
    """
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
