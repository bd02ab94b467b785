"""The cache writer: resumable shard by shard, safe for several ranks writing disjoint shards.

Usage (what precompute does; see ``tests.synthetic.write_synthetic_cache`` for a small one)::

    w = CacheWriter(cfg.cache.dir, records, cfg.cache.shard_size, bad, cfg.cache.codec, cfg.cache.codecs)
    w.declare_anchor("depth", dims, fingerprint, decoders)        # every rank; idempotent
    for s in w.shards_for_rank(rank, world):
        if not w.shard_done(s):
            w.write_samples(s)
        if not w.shard_done(s, "depth"):
            w.write_targets(s, "depth", arrays)
    w.finalize()                                                   # once, after every rank is done

Each shard part (the tar, or one anchor's targets) is committed by a progress
record written last and atomically; a part without one is rewritten from
scratch on rerun, so an interrupted run converges to the same bytes as an
uninterrupted one. Adding an anchor to a finished cache is declare_anchor +
write_targets for every shard + finalize, without touching images or other anchors.
"""
from __future__ import annotations

import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import tarfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import zarr

from covt import fs
from covt.anchors import ANCHORS, array_shape, get_anchor
from shards import layout
from shards.codecs import (
    COMPRESSION_DEFAULTS,
    Codec,
    CodecError,
    check_default_codec,
    codec_for,
    get_codec,
    stored_name,
    zarr_compressors,
)
from shards.samples import BadRecord, Record

RESUME = "precompute resumes, keeping every committed shard"
LOGICAL_DTYPE = {"float": "float32", "mask": "bool", "count": "int32"}


class CacheMismatchError(ValueError):
    """The cache directory already holds something incompatible with what is being written."""


def _created_by() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("covt-trainer", "zarr", "numpy", "torch", "webdataset"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _records_identity(records: Sequence[Record], shard_size: int, bad: Iterable[BadRecord],
                      subset: dict | None) -> dict:
    ids = "\n".join(f"{r.index}\t{r.source_index}\t{r.id}" for r in records)
    return {
        **({"subset": subset} if subset is not None else {}),
        "num_samples": len(records),
        "shard_size": shard_size,
        "records_sha256": layout.sha256_bytes(ids.encode()),
        "bad_records": [{"source_index": b.source_index, "id": b.id, "reason": b.reason, "kind": b.kind} for b in bad],
    }


def _diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class CacheWriter:
    def __init__(
        self,
        cache_dir: str | Path,
        records: Sequence[Record],
        shard_size: int,
        bad_records: Iterable[BadRecord] = (),
        default_codec: str = "bf16",
        codecs: dict[str, str] | None = None,
        compression: dict[str, str] | None = None,
        subset: dict | None = None,
    ):
        """``compression`` overrides :data:`shards.codecs.COMPRESSION_DEFAULTS` per kind of array
        (``{"float": "none"}``); it applies to anchors declared from now on and is part of their declaration.
        ``subset`` (``{"size", "seed"}`` of ``data.subset``, or None) says how ``records`` were chosen; the
        manifest records it."""
        if shard_size < 1:
            raise ValueError(f"cache.shard_size must be >= 1, got {shard_size}")
        if not records:
            raise ValueError("no good records to write (every record was bad, or the dataset is empty)")
        for i, r in enumerate(records):
            if r.index != i:
                raise ValueError(f"record id={r.id!r} has index {r.index}, expected {i} "
                                 "(pass load_records' list as is)")
        self.cache_dir = Path(cache_dir)
        self.records = list(records)
        self.shard_size = int(shard_size)
        self.bad_records = list(bad_records)
        self.subset = subset
        check_default_codec(default_codec)
        self.default_codec = default_codec
        self.codecs = dict(codecs or {})
        for key in self.codecs:
            anchor, _, array = key.partition("/")
            if anchor not in ANCHORS or array not in {a.name for a in ANCHORS[anchor].arrays}:
                raise CodecError(f"cache.codecs: {key!r} is not an anchor/array (e.g. 'depth/features')")
        unknown = set(compression or {}) - set(COMPRESSION_DEFAULTS)
        if unknown:
            raise CodecError(f"compression: {sorted(unknown)} are not kinds of arrays "
                             f"(use {list(COMPRESSION_DEFAULTS)})")
        self.compression = {**COMPRESSION_DEFAULTS, **(compression or {})}
        for kind, spec in self.compression.items():
            zarr_compressors(spec, f"compression[{kind!r}]")
        for sub in (layout.SAMPLES_DIR, layout.PROGRESS_DIR, layout.DECODERS_DIR):
            (self.cache_dir / sub).mkdir(parents=True, exist_ok=True)
        targets = self.cache_dir / layout.TARGETS_DIR
        self._ensure_zarr_group(targets, {"schema": layout.SCHEMA})
        schema = zarr.open_group(str(targets), mode="r").attrs.asdict().get("schema")
        if schema != layout.SCHEMA:
            raise CacheMismatchError(f"{self.cache_dir} holds a {schema!r} cache, this code writes {layout.SCHEMA!r}; "
                                     f"use a new cache.dir or delete this one")

        identity = _records_identity(self.records, self.shard_size, self.bad_records, self.subset)
        existing = layout.create_exclusive_json(self.cache_dir / layout.PROGRESS_DIR / "records.json", identity)
        if existing != identity:
            raise CacheMismatchError(
                f"{self.cache_dir} was written from different records or settings "
                f"(differs in {_diff(existing, identity)}); use a new cache.dir or delete this one"
            )
        self._declarations: dict[str, dict] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}

    # ------------------------------------------------------------------ shards
    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.records) / self.shard_size)

    def shard_records(self, shard_id: int) -> list[Record]:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard {shard_id} out of range (cache has {self.num_shards} shards)")
        return self.records[shard_id * self.shard_size:(shard_id + 1) * self.shard_size]

    def shards_for_rank(self, rank: int, world: int) -> list[int]:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in a world of {world}")
        return [s for s in range(self.num_shards) if s % world == rank]

    @property
    def decoders_dir(self) -> Path:
        return self.cache_dir / layout.DECODERS_DIR

    def _path(self, rel: str) -> Path:
        return self.cache_dir / rel

    # ----------------------------------------------------------------- anchors
    @staticmethod
    def _create_aside(path: Path, build: Callable[[Path], object]) -> bool:
        """Build a directory beside ``path`` with ``build(tmp)`` and rename it into place, so no reader
        sees half of it. False if another rank filled ``path`` meanwhile (the caller compares what is there)."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        build(tmp)
        try:
            os.rename(tmp, path)  # replaces a missing or empty dir; fails if another rank filled it
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False

    @classmethod
    def _ensure_zarr_group(cls, path: Path, attributes: dict) -> bool:
        """Create a zarr group at ``path`` atomically. False if it already existed."""
        if (path / "zarr.json").exists():
            return False
        return cls._create_aside(path, lambda tmp: zarr.open_group(str(tmp), mode="w", attributes=attributes))

    def _declaration(self, anchor: str, dims: dict, fingerprint: dict, decoders: list[str],
                     codecs: dict[str, str], calibration: dict[str, dict]) -> dict:
        spec = get_anchor(anchor)
        arrays = {}
        for arr in spec.arrays:
            try:
                shape = array_shape(anchor, arr.name, dims)
            except KeyError as e:
                raise ValueError(f"declare_anchor({anchor!r}): {e.args[0]}") from None
            codec = codec_for(anchor, arr.name, arr.kind, self.default_codec,
                              {**self.codecs, **{f"{anchor}/{k}": v for k, v in codecs.items()}})
            arrays[arr.name] = {
                "shape": list(shape),
                "dtype": LOGICAL_DTYPE[arr.kind],
                "kind": arr.kind,
                "codec": codec.name,
                "compression": self.compression[arr.kind],
                "stored": {
                    stored_name(arr.name, p.suffix): {"dtype": p.dtype.name, "shape": list(p.shape)}
                    for p in codec.stored(shape)
                },
                **({"calibration": calibration[arr.name]} if arr.name in calibration else {}),
            }
        decl = {
            "anchor": anchor,
            "num_samples": len(self.records),
            "shard_size": self.shard_size,
            "dims": {k: int(v) for k, v in dims.items()},
            "fingerprint": fingerprint,
            "decoders": sorted(decoders),
            "arrays": arrays,
        }
        return json.loads(layout.dumps(decl))  # normalise tuples etc. to what a reread gives

    def declare_anchor(self, anchor: str, dims: dict[str, int], fingerprint: dict, decoders: list[str],
                       overwrite: bool = False, codecs: dict[str, str] | None = None,
                       calibration: dict[str, dict] | None = None) -> None:
        """Create ``targets.zarr/<anchor>`` for this cache; safe to call from every rank.

        An existing declaration with other dims, fingerprint or codecs is an error
        unless ``overwrite``, which deletes that anchor's targets first. ``codecs``
        (array -> codec) overrides the writer's choice for this anchor; ``calibration``
        (array -> how that choice was measured) is recorded with it.
        """
        decl = self._declaration(anchor, dims, fingerprint, decoders, codecs or {}, calibration or {})
        missing = [d for d in decl["decoders"] if not (self.decoders_dir / d).is_file()]
        if missing:
            raise FileNotFoundError(f"declare_anchor({anchor!r}): decoder files missing from "
                                    f"{self.decoders_dir}: {missing}")
        decl_path = self._path(layout.declaration_name(anchor))
        group = self.cache_dir / layout.TARGETS_DIR / anchor
        if decl_path.exists():
            old = layout.read_json(decl_path)
            if old != decl:
                if not overwrite:
                    raise CacheMismatchError(
                        f"anchor {anchor!r} is already in {self.cache_dir} with a different {_diff(old, decl)}; "
                        f"a changed anchor must go to a new cache.dir, or be written with overwrite=True"
                    )
                self._drop_anchor(anchor)
        elif group.exists() and overwrite:
            self._drop_anchor(anchor)

        if not (group / "zarr.json").exists():  # another rank may win the race: compared below
            self._create_aside(group, lambda tmp: self._build_anchor_group(tmp, decl))
        on_disk = zarr.open_group(str(group), mode="r").attrs.asdict().get("declaration")
        if on_disk != decl:
            raise CacheMismatchError(
                f"{group} was created for a different declaration of {anchor!r} "
                f"(differs in {_diff(on_disk or {}, decl)}); use a new cache.dir or overwrite=True"
            )
        held = layout.create_exclusive_json(decl_path, decl)
        if held != decl:
            raise CacheMismatchError(f"another writer declared {anchor!r} differently (differs in {_diff(held, decl)})")
        self._declarations[anchor] = decl

    def _build_anchor_group(self, tmp: Path, decl: dict) -> None:
        zarr.open_group(str(tmp), mode="w", attributes={"declaration": decl})
        n = len(self.records)
        for array, info in decl["arrays"].items():
            for name, part in info["stored"].items():
                shape = tuple(part["shape"])
                zarr.create_array(
                    store=str(tmp / name),
                    shape=(n, *shape),
                    chunks=(1, *shape),
                    shards=(self.shard_size, *shape),
                    dtype=part["dtype"],
                    fill_value=0,
                    compressors=zarr_compressors(info["compression"]),
                    attributes={"array": array, "codec": info["codec"], "compression": info["compression"],
                                "kind": info["kind"],
                                "logical_shape": info["shape"], "logical_dtype": info["dtype"]},
                    config={"write_empty_chunks": True},
                )

    def _drop_anchor(self, anchor: str) -> None:
        shutil.rmtree(self.cache_dir / layout.TARGETS_DIR / anchor, ignore_errors=True)
        for p in (self.cache_dir / layout.PROGRESS_DIR).glob(f"shard-*.{anchor}.json"):
            p.unlink()
        self._path(layout.declaration_name(anchor)).unlink(missing_ok=True)
        self._arrays = {k: v for k, v in self._arrays.items() if k[0] != anchor}
        self._declarations.pop(anchor, None)

    def declaration(self, anchor: str) -> dict | None:
        """The anchor's declaration in this cache (codecs, shapes, calibration), or None if not declared."""
        try:
            return self._decl(anchor)
        except KeyError:
            return None

    def codec_choice(self, anchor: str, array: str) -> Codec:
        """The codec this writer would declare for ``anchor/array`` (before any calibration)."""
        kind = get_anchor(anchor).array(array).kind
        return codec_for(anchor, array, kind, self.default_codec, self.codecs)

    def sync(self) -> None:
        """Take in what other ranks committed meanwhile (their anchor declarations): they share this folder, so
        there is nothing to do here; ``shards.storage.UploadingWriter`` pulls them from its store."""

    def _decl(self, anchor: str) -> dict:
        if anchor not in self._declarations:
            path = self._path(layout.declaration_name(anchor))
            if not path.exists():
                raise KeyError(f"anchor {anchor!r} is not declared in {self.cache_dir}; call declare_anchor first")
            self._declarations[anchor] = layout.read_json(path)
        return self._declarations[anchor]

    def _zarr(self, anchor: str, name: str) -> zarr.Array:
        key = (anchor, name)
        if key not in self._arrays:
            # write_empty_chunks is a runtime setting (not stored): without it an all-zero shard
            # (e.g. no SAM masks) writes no file at all
            arr = zarr.open_array(str(self.cache_dir / layout.TARGETS_DIR / anchor / name), mode="r+")
            self._arrays[key] = arr.with_config({"write_empty_chunks": True})
        return self._arrays[key]

    # -------------------------------------------------------------- progress
    def shard_done(self, shard_id: int, anchor: str | None = None) -> bool:
        recs = self.shard_records(shard_id)
        if anchor is None:
            prog_path = self._path(layout.samples_progress_name(shard_id))
            tar_path = self._path(layout.tar_name(shard_id))
            if not prog_path.exists() or not tar_path.exists():
                return False
            prog = layout.read_json(prog_path)
            held = [(s["index"], s["id"]) for s in prog["samples"]]
            if held != [(r.index, r.id) for r in recs]:
                raise CacheMismatchError(f"{tar_path} holds other records than this run's shard {shard_id}; "
                                         "use a new cache.dir")
            return tar_path.stat().st_size == prog["bytes"]
        prog_path = self._path(layout.targets_progress_name(shard_id, anchor))
        if not prog_path.exists():
            return False
        prog = layout.read_json(prog_path)
        return prog.get("declaration_sha256") == layout.sha256_bytes(layout.dumps(self._decl(anchor)).encode())

    # --------------------------------------------------------------- samples
    def write_samples(self, shard_id: int) -> None:
        """Write ``samples/shard-XXXXXX.tar`` (original image bytes + conversation JSON) and commit it."""
        recs = self.shard_records(shard_id)
        tar_path = self._path(layout.tar_name(shard_id))
        prog_path = self._path(layout.samples_progress_name(shard_id))
        prog_path.unlink(missing_ok=True)  # uncommit first: the old tar is about to change
        tmp = tar_path.with_name(tar_path.name + ".partial")
        samples = []
        with (fs.naming_disk_full(tar_path, RESUME), open(tmp, "wb") as raw,
              tarfile.open(fileobj=raw, mode="w", format=layout.TAR_FORMAT, encoding=layout.TAR_ENCODING) as tar):
            for rec in recs:
                key = layout.sample_key(rec.index)
                members = []
                image_members = [f"{key}.img{i}{(p.suffix.lower() or '.bin')}" for i, p in enumerate(rec.images)]
                meta = {
                    "id": rec.id, "index": rec.index, "source_index": rec.source_index,
                    "conversations": rec.conversations,
                    "images": [p.name for p in rec.images], "image_members": image_members,
                }
                payloads = [(f"{key}.json", layout.dumps(meta).encode())]
                for name, image in zip(image_members, rec.images):
                    payloads.append((name, image.read_bytes()))  # a file, or a parquet row's bytes, unchanged
                for name, data in payloads:
                    offset_data = tar.offset + len(layout.tar_header(name, len(data)))
                    tar.addfile(layout.tar_member_info(name, len(data)), io.BytesIO(data))
                    members.append({"name": name, "offset": offset_data, "size": len(data),
                                    "sha256": layout.sha256_bytes(data)})
                samples.append({"index": rec.index, "key": key, "id": rec.id, "source_index": rec.source_index,
                                "members": members})
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, tar_path)
        layout.atomic_write_json(prog_path, {
            "shard": shard_id, "tar": layout.tar_name(shard_id),
            "bytes": tar_path.stat().st_size, "sha256": fs.sha256_file(tar_path), "samples": samples,
        })

    # --------------------------------------------------------------- targets
    def _check_arrays(self, shard_id: int, anchor: str, arrays: dict[str, np.ndarray], n: int) -> None:
        decl = self._decl(anchor)
        where = f"write_targets(shard {shard_id}, {anchor!r})"
        missing, extra = set(decl["arrays"]) - set(arrays), set(arrays) - set(decl["arrays"])
        if missing or extra:
            raise ValueError(f"{where}: arrays {sorted(arrays)} do not match the anchor's {sorted(decl['arrays'])}")
        for name, info in decl["arrays"].items():
            a = np.asarray(arrays[name])
            want = (n, *info["shape"])
            if a.shape != want:
                raise ValueError(f"{where}: {anchor}/{name} has shape {a.shape}, expected {want} "
                                 f"({n} samples in the shard x declared {tuple(info['shape'])})")
            kind = info["kind"]
            ok = {"float": np.issubdtype(a.dtype, np.floating), "mask": a.dtype == np.bool_,
                  "count": np.issubdtype(a.dtype, np.integer)}[kind]
            if not ok:
                raise ValueError(f"{where}: {anchor}/{name} has dtype {a.dtype}, expected {info['dtype']}")
            if kind == "float" and not np.isfinite(a).all():
                bad = self.shard_records(shard_id)[int(np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(axis=1))[0])]
                raise ValueError(f"{where}: {anchor}/{name} has NaN/inf values "
                                 f"(sample index {bad.index}, id {bad.id!r})")

    def write_targets(self, shard_id: int, anchor: str, arrays: dict[str, np.ndarray]) -> None:
        """Write one anchor's targets for one shard (arrays are ``(n_in_shard, *shape)``) and commit them.

        Thread-safe for distinct ``(shard_id, anchor)`` pairs: each writes its own
        zarr shard files and commit record, and the heavy parts (bf16 rounding,
        zstd, crc32c) run in C without the GIL, so anchors can be written in parallel.
        """
        recs = self.shard_records(shard_id)
        n, start = len(recs), recs[0].index
        self._check_arrays(shard_id, anchor, arrays, n)
        decl = self._decl(anchor)
        prog_path = self._path(layout.targets_progress_name(shard_id, anchor))
        prog_path.unlink(missing_ok=True)
        out = {}
        for name, info in decl["arrays"].items():
            codec: Codec = get_codec(info["codec"], info["kind"], f"{anchor}/{name}")
            x = np.asarray(arrays[name])
            try:
                parts, error = codec.encode_measured(x)
            except CodecError as e:
                raise CodecError(f"shard {shard_id}, {anchor}/{name}: {e}") from None
            stored = {}
            for suffix, part in parts.items():
                sname = stored_name(name, suffix)
                arr = self._zarr(anchor, sname)
                chunk_key = arr.metadata.encode_chunk_key((shard_id,) + (0,) * (arr.ndim - 1))
                shard_file = self.cache_dir / layout.TARGETS_DIR / anchor / sname / chunk_key
                # start from an empty zarr shard so a crash leftover never leaks into the bytes
                shard_file.unlink(missing_ok=True)
                with fs.naming_disk_full(shard_file, RESUME):
                    arr[start:start + n] = part
                stored[sname] = {
                    "file": shard_file.relative_to(self.cache_dir).as_posix(),
                    "file_bytes": shard_file.stat().st_size,
                    "checksum": layout.TARGET_CHECKSUM,
                    "file_checksum": layout.checksum_file(shard_file),
                    "sample_checksums": [layout.checksum(p) for p in part],
                }
            out[name] = {"error": error, "stored": stored}
        layout.atomic_write_json(prog_path, {
            "shard": shard_id, "anchor": anchor, "first_index": start, "count": n,
            "declaration_sha256": layout.sha256_bytes(layout.dumps(decl).encode()), "arrays": out,
        })

    # -------------------------------------------------------------- manifest
    def declared_anchors(self) -> list[str]:
        prefix = "anchor-"
        return sorted(p.stem[len(prefix):] for p in (self.cache_dir / layout.PROGRESS_DIR).glob(f"{prefix}*.json"))

    def finalize(self) -> dict:
        """Check every shard is committed and write ``manifest.json``; returns the manifest."""
        missing = [s for s in range(self.num_shards) if not self.shard_done(s)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.cache_dir}: sample tars missing or uncommitted "
                               f"for shards {missing}")
        anchors = {}
        shard_progress: dict[int, dict[str, str]] = {s: {} for s in range(self.num_shards)}
        for anchor in self.declared_anchors():
            decl = self._decl(anchor)
            missing = [s for s in range(self.num_shards) if not self.shard_done(s, anchor)]
            if missing:
                raise RuntimeError(f"cannot finalize {self.cache_dir}: anchor {anchor!r} has no committed targets "
                                   f"for shards {missing} (a run that computed it was cut short: rerun "
                                   f"`python -m precompute --config YOUR_CONFIG --anchors {anchor}` on this "
                                   f"cache; it resumes)")
            anchors[anchor] = self._anchor_manifest(anchor, decl, shard_progress)
        shards = []
        for s in range(self.num_shards):
            prog_path = self._path(layout.samples_progress_name(s))
            prog = layout.read_json(prog_path)
            shard_progress[s]["samples"] = fs.sha256_file(prog_path)
            shards.append({"id": s, "tar": prog["tar"], "count": len(prog["samples"]),
                           "first_index": prog["samples"][0]["index"], "bytes": prog["bytes"],
                           "sha256": prog["sha256"], "progress_sha256": shard_progress[s]})
        bad = self.bad_records
        manifest = {
            "schema": layout.SCHEMA,
            "created_by": _created_by(),
            "num_samples": len(self.records),
            "subset": self.subset,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "shards": shards,
            "anchors": anchors,
            "bad_records": {
                "count": len(bad),
                "by_kind": dict(sorted(Counter(b.kind for b in bad).items())),
                "records": [{"source_index": b.source_index, "id": b.id, "kind": b.kind, "reason": b.reason}
                            for b in bad],
            },
        }
        manifest[layout.MANIFEST_CHECKSUM] = layout.manifest_checksum(manifest)
        self.remove_interrupted_creations()
        layout.atomic_write_json(self.cache_dir / layout.MANIFEST, manifest)
        return manifest

    def remove_interrupted_creations(self) -> list[Path]:
        """The ``.NAME.<id>.tmp`` folders and files a killed run left while creating a zarr group or writing a
        decoder (:meth:`_create_aside`, ``fs.atomic_file``). Called at ``finalize``: every rank of this launch
        is past its writes, so any left is a dead run's."""
        leftovers = [p for folder in (self.cache_dir, self.cache_dir / layout.TARGETS_DIR, self.decoders_dir)
                     for p in folder.glob(".*.tmp")]
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        return leftovers

    def _anchor_manifest(self, anchor: str, decl: dict, shard_progress: dict) -> dict:
        n = len(self.records)
        arrays = {}
        progs = []
        for s in range(self.num_shards):
            path = self._path(layout.targets_progress_name(s, anchor))
            progs.append(layout.read_json(path))
            shard_progress[s][anchor] = fs.sha256_file(path)
        for name, info in decl["arrays"].items():
            stored_bytes = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                               for p in info["stored"].values())
            disk = sum(p["arrays"][name]["stored"][sn]["file_bytes"] for p in progs for sn in info["stored"])
            errors = [p["arrays"][name]["error"] for p in progs]
            error = None
            if errors and errors[0] is not None:
                sq_err, sq_ref = sum(e["sum_sq_err"] for e in errors), sum(e["sum_sq_ref"] for e in errors)
                error = {"max_abs": max(e["max_abs"] for e in errors),
                         "rel_l2": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else math.sqrt(sq_err)}
            arrays[name] = {**info, "stored_bytes_per_sample": stored_bytes,
                            "disk_bytes_per_sample": disk / n, "measured_error": error}
        decoders = {d: {"sha256": fs.sha256_file(self.decoders_dir / d),
                        "bytes": (self.decoders_dir / d).stat().st_size} for d in decl["decoders"]}
        return {"tokens": get_anchor(anchor).tokens, "dims": decl["dims"], "fingerprint": decl["fingerprint"],
                "decoders": decoders, "arrays": arrays}
