"""Reading a cache: random access to one sample (:class:`Cache`) and the training stream (:class:`StreamingDataset`).

The stream of rank ``r`` of ``W`` is a pure function of ``(seed, r, W)``: for
each epoch a seeded order over all samples (shards shuffled, then samples
within each shard, so reads stay local), of which rank ``r`` takes positions
``r, r+W, ...``, truncated so every rank gets ``N // W`` samples an epoch.
Inside a DataLoader with ``M`` workers and the same ``batch_size``, worker
``w`` yields the stream's batches ``w, w+M, ...``, which is exactly the order
the DataLoader collects them in, so the loader returns the rank stream itself.
``start=k`` resumes at the rank stream's ``k``-th sample without reading the
ones before.
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from covt.images import open_rgb
from shards import integrity, layout, storage
from shards.codecs import get_codec, stored_suffix
from shards.integrity import DamagedSampleError
from shards.lock import lock_holder_message
from shards.mirror import Mirror

log = logging.getLogger(__name__)

TORCH_DTYPE = {"float": torch.float32, "mask": torch.bool, "count": torch.int64}
MAX_OPEN_TARS = 16  # tar descriptors kept open per process
# a remote cache's: only the tar of the shard being read, the one its local copy pins (an open descriptor
# would keep an evicted copy on disk, beyond cache.local_max_gb)
MAX_OPEN_REMOTE_TARS = 1
PREFETCH_SHARDS = 2  # shards of a remote cache fetched ahead of the stream


class CacheError(ValueError):
    """A directory that is not a readable cache, or a sample/key that is not in it."""


class Cache:
    """One cache, read-only, in a local folder or at an fsspec URL (``s3://...``: files are fetched into a
    bounded local copy, ``local_dir`` / ``local_max_bytes``, see ``shards.storage``). With ``verify`` (the
    default) every sample read is checked against its commit records (``shards.integrity``): a damaged one
    raises :class:`DamagedSampleError`."""

    def __init__(self, cache_dir: str | Path, verify: bool = True, strict: bool = True,
                 local_dir: str | Path | None = None, local_max_bytes: int = storage.DEFAULT_MAX_BYTES):
        """``strict``: an edited manifest (its self-checksum differs) is an error; ``inspect`` opens with
        ``strict=False`` to summarise it and report the problem."""
        self.location = str(cache_dir)
        self.verify = verify
        self._local_args = (local_dir, local_max_bytes)
        self._store = storage.filesystem(self.location) if storage.is_url(cache_dir) else None
        self.cache_dir = Path(self.location)
        self.manifest = self._read_manifest()
        path = f"{self.location}/{layout.MANIFEST}"
        schema = self.manifest.get("schema")
        if schema != layout.SCHEMA:
            raise CacheError(f"{path}: schema {schema!r}, this code reads {layout.SCHEMA!r}; rewrite the cache")
        self.manifest_problem = layout.manifest_problem(self.manifest) or layout.count_problem(self.manifest)
        if strict and self.manifest_problem:
            raise CacheError(f"{path}: {self.manifest_problem}")
        self._mirror = None if self._store is None else self._open_mirror(local_dir, local_max_bytes)
        busy = lock_holder_message(self.cache_dir) if self._mirror is None else None  # a URL: the manifest is last
        if strict and busy:
            raise CacheError(f"{self.cache_dir}: {busy}")
        self.num_samples: int = self.manifest["num_samples"]
        self.shard_size: int = self.manifest["shard_size"]
        self.num_shards: int = self.manifest["num_shards"]
        self.anchors: list[str] = list(self.manifest["anchors"])
        self._pid = None
        self._reset_handles()

    def _read_manifest(self) -> dict:
        where = f"{self.location}/{layout.MANIFEST}"
        try:
            raw = (self._store[0].cat_file(f"{self._store[1]}/{layout.MANIFEST}") if self._store is not None
                   else (self.cache_dir / layout.MANIFEST).read_bytes())
        except NotADirectoryError:
            raise CacheError(f"{self.location} is a file, not a cache folder (cache.dir names the folder "
                             f"precompute wrote)") from None
        except FileNotFoundError:
            hint = storage.unfinished_hint(self.cache_dir if self._store is None else self.location)
            raise CacheError(f"{self.location} is not a shards cache: no {layout.MANIFEST}{hint}") from None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise CacheError(f"{where}: not valid JSON: {e}") from None

    def _open_mirror(self, local_dir: str | Path | None, local_max_bytes: int) -> Mirror:
        """The local copy of a cache at a URL: one folder per manifest version, so a rewritten cache never
        mixes with old files; each process pins the files of the shard it reads."""
        version = layout.sha256_bytes(layout.dumps(self.manifest).encode())[:16]
        self.cache_dir = storage.local_copy_dir(self.location, local_dir, version)
        files_per_shard = 1 + sum(len(info["stored"]) for a in self.manifest["anchors"].values()
                                  for info in a["arrays"].values())
        return Mirror(functools.partial(storage.filesystem, self.location), self.cache_dir, local_max_bytes,
                      pin_files=files_per_shard)

    @property
    def remote(self) -> bool:
        return self._mirror is not None

    def local_path(self, rel: str) -> Path:
        """A local path to the cache's file ``rel``, fetched first from a remote cache (a file missing there
        gives a path that does not exist: callers report it as missing)."""
        return self._mirror.path(rel) if self._mirror is not None else self.cache_dir / rel

    def shard_files(self, shard_id: int, anchors: list[str] | None = None) -> list[str]:
        """Every file a shard's samples are read from: its commit records, tar and zarr shard files."""
        rels = [layout.samples_progress_name(shard_id), layout.tar_name(shard_id)]
        for anchor in self.anchors if anchors is None else anchors:
            rels.append(layout.targets_progress_name(shard_id, anchor))
            for info in self._anchor(anchor)["arrays"].values():
                rels += [self._zarr_shard_file(anchor, sname, shard_id) for sname in info["stored"]]
        return rels

    def prefetch(self, shard_id: int, anchors: list[str] | None = None) -> None:
        """Start fetching a remote shard's files in the background (nothing to do for a local cache)."""
        if self._mirror is not None:
            self._mirror.prefetch(self.shard_files(shard_id, anchors))

    def _reset_handles(self) -> None:
        """File handles and zarr arrays are per process (DataLoader workers fork)."""
        self._pid = os.getpid()
        self._files: dict[int, int] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._progress: dict[tuple[int, str], dict] = {}
        self._id_index: dict[str, int] | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self.close()  # this process's copies of the parent's descriptors; the parent keeps its own
            self._reset_handles()

    def __getstate__(self):  # spawned workers reopen everything
        return {"location": self.location, "verify": self.verify, "local": self._local_args}

    def __setstate__(self, state):  # the parent checked the manifest
        self.__init__(state["location"], verify=state["verify"], strict=False, local_dir=state["local"][0],
                      local_max_bytes=state["local"][1])

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------ layout
    def dims(self, anchor: str) -> dict[str, int]:
        return dict(self._anchor(anchor)["dims"])

    def _anchor(self, anchor: str) -> dict:
        try:
            return self.manifest["anchors"][anchor]
        except KeyError:
            raise CacheError(f"anchor {anchor!r} is not in the cache {self.location} (has {self.anchors}); compute "
                             f"it into this cache with `python -m precompute --config YOUR_CONFIG --anchors {anchor}`"
                             ) from None

    @property
    def decoders_dir(self) -> Path:
        """The decoder files of the cache's anchors (a remote cache's: fetched into the local copy); with
        ``verify``, each checked against the manifest here, before any head loads one."""
        if self._mirror is not None:
            (self.cache_dir / layout.DECODERS_DIR).mkdir(parents=True, exist_ok=True)
        for anchor, a in self.manifest["anchors"].items():
            for d, info in a["decoders"].items():
                self.local_path(f"{layout.DECODERS_DIR}/{d}")
                if self.verify:
                    integrity.check_decoder(self.cache_dir, d, info, anchor)
        return self.cache_dir / layout.DECODERS_DIR

    def shard_of(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise CacheError(f"sample index {index} out of range (cache has {self.num_samples} samples)")
        return index // self.shard_size

    def shard_progress(self, shard_id: int, part: str = "samples") -> dict:
        """Commit record of shard ``shard_id``: its tar (``part="samples"``) or an anchor's targets;
        checked once per process against the manifest when verifying."""
        self._check_pid()
        key = (shard_id, part)
        if key not in self._progress:
            rel = (layout.samples_progress_name(shard_id) if part == "samples"
                   else layout.targets_progress_name(shard_id, part))
            self.local_path(rel)
            if self.verify:
                shard = self.manifest["shards"][shard_id]
                self._progress[key] = integrity.check_commit_record(self.cache_dir, rel, shard["progress_sha256"]
                                                                    .get(part), shard_id)
                if part == "samples":
                    integrity.check_sample_count(rel, self._progress[key], shard["count"])
            elif not (self.cache_dir / rel).is_file():
                raise CacheError(f"{self.cache_dir}: commit record {rel} of shard {shard_id} is missing")
            else:
                self._progress[key] = layout.read_json(self.cache_dir / rel)
        return self._progress[key]

    def resolve(self, key: str | int) -> int:
        """Sample index from an index, a sample key (``000000012``) or a record id (digit strings are
        indices/keys first)."""
        if isinstance(key, (int, np.integer)):
            index = int(key)
        elif str(key).isdigit() and int(key) < self.num_samples:
            index = int(key)
        else:
            if self._id_index is None:
                self._id_index = {s["id"]: s["index"] for sh in range(self.num_shards)
                                  for s in self.shard_progress(sh)["samples"]}
            if str(key) not in self._id_index:
                raise CacheError(f"no sample with index, key or record id {key!r} in {self.cache_dir}")
            index = self._id_index[str(key)]
        self.shard_of(index)
        return index

    # ------------------------------------------------------------------ bytes
    def _read_member(self, shard_id: int, member: dict) -> bytes:
        self._check_pid()
        fd = self._files.get(shard_id)
        if fd is None:
            if len(self._files) >= (MAX_OPEN_REMOTE_TARS if self.remote else MAX_OPEN_TARS):
                os.close(self._files.pop(next(iter(self._files))))
            fd = self._files[shard_id] = os.open(self.local_path(layout.tar_name(shard_id)), os.O_RDONLY)
        return os.pread(fd, member["size"], member["offset"])

    def member_bytes(self, entry: dict, member: dict) -> bytes:
        """The payload of one tar member of the sample ``entry``, checked when verifying."""
        shard_id = self.shard_of(entry["index"])
        data = self._read_member(shard_id, member)
        if self.verify:
            integrity.check_member(layout.tar_name(shard_id), entry, member, data)
        elif len(data) != member["size"]:
            raise CacheError(f"{layout.tar_name(shard_id)}: member {member['name']} is truncated")
        return data

    def sample_entry(self, index: int) -> dict:
        shard_id = self.shard_of(index)
        entry = self.shard_progress(shard_id)["samples"][index - shard_id * self.shard_size]
        assert entry["index"] == index, f"{layout.samples_progress_name(shard_id)} is out of order"
        return entry

    def stored(self, anchor: str, name: str) -> zarr.Array:
        self._check_pid()
        key = (anchor, name)
        if key not in self._arrays:
            self.local_path(f"{layout.TARGETS_DIR}/{anchor}/{name}/zarr.json")
            self._arrays[key] = zarr.open_array(str(self.cache_dir / layout.TARGETS_DIR / anchor / name), mode="r")
        return self._arrays[key]

    def _zarr_shard_file(self, anchor: str, name: str, shard_id: int) -> str:
        arr = self.stored(anchor, name)
        key = arr.metadata.encode_chunk_key((shard_id,) + (0,) * (arr.ndim - 1))
        return f"{layout.TARGETS_DIR}/{anchor}/{name}/{key}"

    def stored_value(self, anchor: str, array: str, stored: str, index: int) -> np.ndarray:
        """One sample's stored array ``anchor/stored`` (a part of the logical ``array``), checked when verifying."""
        shard_id = self.shard_of(index)
        if self._mirror is not None:  # zarr reads the local copy: make sure it is there
            self.local_path(self._zarr_shard_file(anchor, stored, shard_id))
        if not self.verify:
            return np.asarray(self.stored(anchor, stored)[index])
        info = self.shard_progress(shard_id, anchor)["arrays"][array]["stored"][stored]
        entry, name = self.sample_entry(index), f"{anchor}/{stored}"
        integrity.check_target_file(self.cache_dir, info, entry, name)
        try:
            value = np.asarray(self.stored(anchor, stored)[index])
        except Exception as e:  # a damaged zarr shard index or compressed chunk fails to decode
            raise DamagedSampleError(f"{info['file']}: {integrity.sample_name(entry)} {name}: unreadable "
                                     f"({type(e).__name__}: {e})") from None
        integrity.check_target(info, index - shard_id * self.shard_size, entry, name, value)
        return value

    def targets(self, index: int, anchors: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for anchor in self.anchors if anchors is None else anchors:
            arrays = {}
            for name, info in self._anchor(anchor)["arrays"].items():
                codec = get_codec(info["codec"], info["kind"], f"{anchor}/{name}")
                parts = {stored_suffix(name, sn): self.stored_value(anchor, name, sn, index)[None]
                         for sn in info["stored"]}
                value = codec.decode(parts, tuple(info["shape"]))[0]
                arrays[name] = torch.from_numpy(np.array(value)).to(TORCH_DTYPE[info["kind"]])
            out[anchor] = arrays
        return out

    def sample(self, index: int, anchors: list[str] | None = None) -> dict:
        entry = self.sample_entry(index)
        meta_member, *image_members = entry["members"]
        meta = json.loads(self.member_bytes(entry, meta_member))
        image_bytes = [self.member_bytes(entry, m) for m in image_members]
        return {
            "index": index,
            "key": entry["key"],
            "id": entry["id"],
            "conversations": meta["conversations"],
            "images": [open_rgb(b) for b in image_bytes],
            "image_bytes": image_bytes,
            "targets": self.targets(index, anchors),
        }

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._mirror is not None:
            self._mirror.close()


def rank_epoch_order(num_samples: int, shard_size: int, seed: int, epoch: int, rank: int, world_size: int,
                     shuffle: bool = True) -> np.ndarray:
    """Sample indices rank ``rank`` reads in ``epoch``: ``N // W`` of them, disjoint across ranks."""
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        num_shards = math.ceil(num_samples / shard_size)
        order = []
        for s in rng.permutation(num_shards):
            lo = s * shard_size
            order.append(lo + rng.permutation(min(shard_size, num_samples - lo)))
        order = np.concatenate(order)
    else:
        order = np.arange(num_samples)
    per_rank = num_samples // world_size
    return order[rank::world_size][:per_rank]


class StreamingDataset(torch.utils.data.IterableDataset):
    def __init__(self, cache_dir: str | Path, anchors: list[str] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0, batch_size: int = 1, shuffle: bool = True,
                 epochs: int | None = None, on_damaged: str = "error", cache_kwargs: dict | None = None):
        super().__init__()
        if on_damaged not in ("error", "skip"):
            raise ValueError(f"on_damaged must be 'error' or 'skip', got {on_damaged!r}")
        self.on_damaged = on_damaged
        self.cache = Cache(cache_dir, **(cache_kwargs or {}))
        for a in anchors or []:
            self.cache._anchor(a)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in a world of {world_size}")
        if batch_size < 1 or start < 0:
            raise ValueError(f"batch_size must be >= 1 and start >= 0 (got {batch_size}, {start})")
        self.per_rank = self.cache.num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"{self.cache.num_samples} samples cannot feed {world_size} ranks")
        self.anchors, self.seed, self.rank, self.world_size = anchors, seed, rank, world_size
        self.start, self.batch_size, self.shuffle, self.epochs = start, batch_size, shuffle, epochs
        if epochs is not None and start > epochs * self.per_rank:
            raise ValueError(f"start={start} is past the end of {epochs} epochs of {self.per_rank} samples")
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite StreamingDataset (epochs=None) has no length")
        return self.epochs * self.per_rank - self.start

    def index_at(self, position: int) -> int:
        """Sample index at ``position`` of this rank's stream (position 0 = first sample of epoch 0)."""
        epoch, offset = divmod(position, self.per_rank)
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = rank_epoch_order(self.cache.num_samples, self.cache.shard_size, self.seed, epoch,
                                                   self.rank, self.world_size, self.shuffle)
        return int(self._orders[epoch][offset])

    def positions(self) -> Iterator[int]:
        """Stream positions this process yields, in order (this worker's share inside a DataLoader)."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        end = None if self.epochs is None else self.epochs * self.per_rank
        for batch in itertools.count(worker, workers):
            first = self.start + batch * self.batch_size
            if end is not None and first >= end:
                return
            last = first + self.batch_size if end is None else min(first + self.batch_size, end)
            yield from range(first, last)

    def indices(self) -> Iterator[int]:
        """Sample indices this process yields, in order."""
        for position in self.positions():
            yield self.index_at(position)

    def __iter__(self) -> Iterator[dict]:
        if not self.cache.remote:
            for position in self.positions():
                yield self.read(position)
            return
        # a remote cache: look about PREFETCH_SHARDS of this process's shards ahead, fetching them in the background
        lookahead = PREFETCH_SHARDS * max(1, self.cache.shard_size // self.world_size)
        upcoming: collections.deque[int] = collections.deque()
        last = None
        for position in self.positions():
            upcoming.append(position)
            shard = self.cache.shard_of(self.index_at(position))
            if shard != last:
                last = shard
                self.cache.prefetch(shard, self.anchors)
            if len(upcoming) > lookahead:
                yield self.read(upcoming.popleft())
        while upcoming:
            yield self.read(upcoming.popleft())

    def read(self, position: int) -> dict:
        """The sample at ``position``. A damaged one stops the stream (``on_damaged="error"``), or its slot is
        filled by the next readable sample of the stream (``"skip"``), so batch shapes, the stage of every
        step and resume positions stay what they would be; the sample says what it replaced
        (``damaged_skipped``: one message per damaged sample passed over) and its slot (``position``)."""
        skipped: list[str] = []
        for offset in range(self.per_rank):
            index = self.index_at(position + offset)
            try:
                sample = self.cache.sample(index, self.anchors)
            except DamagedSampleError as e:
                if self.on_damaged == "error":
                    raise DamagedSampleError(
                        f"damaged sample in {self.cache.location}: {e}. `python -m shards inspect "
                        f"{self.cache.location} --verify` lists every problem; rerun precompute into a new "
                        f"cache.dir to rewrite the cache, or set train.on_damaged_sample=skip to skip damaged "
                        f"samples") from None
                # said once, by the consumer (the trainer's log counts distinct samples), not per loader worker
                log.debug("skipping damaged sample: %s", e)
                skipped.append(f"sample index {index}: {e}")  # one message per sample: counted once however often
                continue
            sample["damaged_skipped"] = skipped
            sample["position"] = position  # where the slot sits in this rank's stream (its optimizer step)
            return sample
        raise DamagedSampleError(f"{self.cache.location}: every sample of rank {self.rank}'s stream is damaged "
                                 f"(first: {skipped[0]})")
