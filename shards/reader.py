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

import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import zarr

from shards import layout
from shards.anchors import get_anchor
from shards.codecs import get_codec, stored_suffix
from shards.views import open_rgb

TORCH_DTYPE = {"float": torch.float32, "mask": torch.bool, "count": torch.int64}


class CacheError(ValueError):
    """A directory that is not a readable cache, or a sample/key that is not in it."""


class Cache:
    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / layout.MANIFEST
        if not path.is_file():
            hint = (" (writing was not finished: run the writer's finalize())"
                    if (self.cache_dir / layout.PROGRESS_DIR).is_dir() else " (run precompute first)")
            raise CacheError(f"{self.cache_dir} is not a shards cache: no {layout.MANIFEST}{hint}")
        try:
            self.manifest = layout.read_json(path)
        except ValueError as e:
            raise CacheError(f"{path}: not valid JSON: {e}") from None
        schema = self.manifest.get("schema")
        if schema != layout.SCHEMA:
            raise CacheError(f"{path}: schema {schema!r}, this code reads {layout.SCHEMA!r}; rewrite the cache")
        self.num_samples: int = self.manifest["num_samples"]
        self.shard_size: int = self.manifest["shard_size"]
        self.num_shards: int = self.manifest["num_shards"]
        self.anchors: list[str] = list(self.manifest["anchors"])
        self._pid = None
        self._reset_handles()

    def _reset_handles(self) -> None:
        """File handles and zarr arrays are per process (DataLoader workers fork)."""
        self._pid = os.getpid()
        self._files: dict[int, int] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._progress: dict[int, dict] = {}
        self._id_index: dict[str, int] | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self.close()  # this process's copies of the parent's descriptors; the parent keeps its own
            self._reset_handles()

    def __getstate__(self):  # spawned workers reopen everything
        return {"cache_dir": self.cache_dir}

    def __setstate__(self, state):
        self.__init__(state["cache_dir"])

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------------ layout
    def dims(self, anchor: str) -> dict[str, int]:
        return dict(self._anchor(anchor)["dims"])

    def _anchor(self, anchor: str) -> dict:
        try:
            return self.manifest["anchors"][anchor]
        except KeyError:
            raise CacheError(f"anchor {anchor!r} is not in the cache {self.cache_dir} (has {self.anchors})") from None

    @property
    def decoders_dir(self) -> Path:
        return self.cache_dir / layout.DECODERS_DIR

    def shard_of(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise CacheError(f"sample index {index} out of range (cache has {self.num_samples} samples)")
        return index // self.shard_size

    def shard_progress(self, shard_id: int) -> dict:
        self._check_pid()
        if shard_id not in self._progress:
            path = self.cache_dir / layout.samples_progress_name(shard_id)
            if not path.is_file():
                raise CacheError(f"{self.cache_dir}: commit record {path.name} of shard {shard_id} is missing")
            self._progress[shard_id] = layout.read_json(path)
        return self._progress[shard_id]

    def resolve(self, key: str | int) -> int:
        """Sample index from an index, a sample key (``000000012``) or a record id (digit strings are indices/keys first)."""
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
            fd = self._files[shard_id] = os.open(self.cache_dir / layout.tar_name(shard_id), os.O_RDONLY)
        data = os.pread(fd, member["size"], member["offset"])
        if len(data) != member["size"]:
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
            self._arrays[key] = zarr.open_array(str(self.cache_dir / layout.TARGETS_DIR / anchor / name), mode="r")
        return self._arrays[key]

    def targets(self, index: int, anchors: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for anchor in self.anchors if anchors is None else anchors:
            arrays = {}
            for name, info in self._anchor(anchor)["arrays"].items():
                codec = get_codec(info["codec"], info["kind"], f"{anchor}/{name}")
                parts = {stored_suffix(name, sn): self.stored(anchor, sn)[index][None] for sn in info["stored"]}
                value = codec.decode(parts, tuple(info["shape"]))[0]
                arrays[name] = torch.from_numpy(np.array(value)).to(TORCH_DTYPE[info["kind"]])
            out[anchor] = arrays
        return out

    def sample(self, index: int, anchors: list[str] | None = None) -> dict:
        entry = self.sample_entry(index)
        shard_id = self.shard_of(index)
        meta_member, *image_members = entry["members"]
        meta = json.loads(self._read_member(shard_id, meta_member))
        image_bytes = [self._read_member(shard_id, m) for m in image_members]
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
                 epochs: int | None = None):
        super().__init__()
        self.cache = Cache(cache_dir)
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

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch."""
        return self.per_rank

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

    def indices(self) -> Iterator[int]:
        """Sample indices this process yields, in order (this worker's share inside a DataLoader)."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        end = None if self.epochs is None else self.epochs * self.per_rank
        for batch in itertools.count(worker, workers):
            first = self.start + batch * self.batch_size
            if end is not None and first >= end:
                return
            last = first + self.batch_size if end is None else min(first + self.batch_size, end)
            for position in range(first, last):
                yield self.index_at(position)

    def __iter__(self) -> Iterator[dict]:
        for index in self.indices():
            yield self.cache.sample(index, self.anchors)
