"""The checks of one sample against what the writer committed: the one place both the training stream
(``shards.reader.Cache`` with ``verify=True``) and ``python -m shards inspect --verify`` use.

What is checked, per sample: the sha256 of each tar member (conversation JSON, image bytes), that the
zarr shard file holding its targets exists (a missing file would otherwise read as zarr's fill value,
zeros), and the crc32c of each stored target array; per shard, once: that each commit record is the
one the manifest names; per cache, each time the trainer builds its heads: that every frozen decoder file
(``decoders/``, metadata JSON included) is the one the manifest names (:func:`check_decoder`).
Each failure is a :class:`DamagedSampleError` naming the file, the sample
(key, index, record id) and the member or array.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covt import fs
from shards import layout


class DamagedSampleError(ValueError):
    """A sample whose bytes differ from what the writer committed (or whose file is gone)."""


def sample_name(entry: dict) -> str:
    return f"sample {entry['key']} (index {entry['index']}, id {entry['id']!r})"


def check_commit_record(cache_dir: Path, rel: str, expected_sha256: str | None, shard_id: int) -> dict:
    """Read a shard's commit record (``progress/...json``) after checking it is the one the manifest names."""
    path = cache_dir / rel
    if not path.is_file():
        raise DamagedSampleError(f"{rel}: commit record of shard {shard_id} missing")
    data = path.read_bytes()
    if layout.sha256_bytes(data) != expected_sha256:
        raise DamagedSampleError(f"{rel}: commit record of shard {shard_id} differs from the manifest")
    return json.loads(data)


def check_sample_count(rel: str, record: dict, expected: int) -> None:
    """A shard's commit record holds as many samples as the manifest counts for that shard."""
    if len(record["samples"]) != expected:
        raise DamagedSampleError(f"{rel}: holds {len(record['samples'])} samples, the manifest counts {expected} "
                                 f"for this shard (the manifest was edited and re-signed?)")


def check_member(tar_rel: str, entry: dict, member: dict, data: bytes) -> None:
    """``data`` read for ``member`` of the sample ``entry`` in ``tar_rel`` is what was written."""
    if len(data) != member["size"]:
        raise DamagedSampleError(f"{tar_rel}: {sample_name(entry)}: member {member['name']} is truncated "
                                 f"({len(data)} of {member['size']} bytes)")
    if layout.sha256_bytes(data) != member["sha256"]:
        raise DamagedSampleError(f"{tar_rel}: {sample_name(entry)}: checksum mismatch in {member['name']}")


def check_target_file(cache_dir: Path, stored: dict, entry: dict, array: str) -> None:
    """The zarr shard file of ``array`` (``anchor/stored name``) exists: zarr would read a missing one as zeros."""
    if not (cache_dir / stored["file"]).is_file():
        raise DamagedSampleError(f"{stored['file']}: {sample_name(entry)} {array}: zarr shard file missing "
                                 f"(zarr would read its samples as fill values)")


def check_target(stored: dict, position: int, entry: dict, array: str, value: np.ndarray) -> None:
    """``value``, the stored array ``array`` of the ``position``-th sample of its shard, is what was written."""
    if layout.checksum(value, stored["checksum"]) != stored["sample_checksums"][position]:
        raise DamagedSampleError(f"{stored['file']}: {sample_name(entry)} {array}: checksum mismatch")


def check_decoder(cache_dir: Path, name: str, info: dict, anchor: str) -> None:
    """``decoders/<name>`` of ``anchor`` is the file the manifest names (``info``: its sha256 and bytes)."""
    rel = f"{layout.DECODERS_DIR}/{name}"
    path = Path(cache_dir) / rel
    if not path.is_file():
        raise DamagedSampleError(f"{rel} ({anchor}): frozen decoder file missing")
    if path.stat().st_size != info["bytes"] or fs.sha256_file(path) != info["sha256"]:
        raise DamagedSampleError(f"{rel} ({anchor}): checksum mismatch, not the file precompute wrote; refusing "
                                 f"to load it (rerun precompute for {anchor!r} on a new cache.dir, or restore it)")
