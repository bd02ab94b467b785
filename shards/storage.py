"""A cache in object storage: ``cache.dir`` as an fsspec URL (``s3://bucket/cache``, ``gs://...``, ``https://...``).

The layout is the local one (``shards.layout``), object for file. Transfers go
through fsspec's own filesystems (s3fs, gcsfs, HTTP); zarr then reads and writes
its usual local store on a local copy, so a shard (its tar, one zarr shard file
per stored array, its commit records) is the unit of transfer: one GET or PUT per
file, never one request per sample and array.

Reading: ``shards.mirror.Mirror`` keeps the local copy (per manifest version, so a rewritten cache never
mixes with an old copy), shared by the processes of a machine and bounded by ``cache.local_max_gb``.

Writing (:class:`UploadingWriter`): a :class:`shards.writer.CacheWriter` on a local
staging folder that uploads each part as it commits: the data files first, the commit
record last, and the manifest after everything. A crash therefore leaves at most
data without its record, which neither a reader (no manifest, or a manifest listing
only committed parts) nor a resumed run (it rewrites the part) accepts. A resumed run
on another machine first pulls the commit records and metadata; local data files are
deleted once uploaded, so the staging folder holds about one shard.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import fsspec

from covt.fs import atomic_file
from shards import layout
from shards.lock import CacheLock, LockFile, describe, holder_alive, lock_holder_message, parse_holder
from shards.mirror import METADATA_SUFFIXES
from shards.writer import CacheMismatchError, CacheWriter

DEFAULT_MAX_BYTES = 50 << 30


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL other than a plain local path (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_home(url: str, local_dir: str | Path | None = None) -> Path:
    """The local folder of one URL's staging and copies: under ``cache.local_dir``, else ``$COVT_CACHE_LOCAL``,
    else the temp dir; one subfolder per URL, so a cache and its validation/ cache never share one."""
    base = Path(local_dir or os.environ.get("COVT_CACHE_LOCAL") or Path(tempfile.gettempdir()) / "covt-cache")
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


def staging_dir(url: str, local_dir: str | Path | None = None) -> Path:
    """The local folder an :class:`UploadingWriter` for ``url`` writes in."""
    return local_home(url, local_dir) / "staging"


def local_copy_dir(url: str, local_dir: str | Path | None, version: str) -> Path:
    """The folder of ``url``'s local copy for one manifest version (``shards.mirror.Mirror``)."""
    return local_home(url, local_dir) / "copy" / version


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the cache's path in it."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


class RemoteLockFile(LockFile):
    """The writer lock of a cache at a URL: the object ``URL/writer.lock``, created only if absent.

    The create is fsspec's ``pipe_file(mode="create")``, a conditional write (``If-None-Match: *`` on S3;
    AWS S3, MinIO and moto honour it). A store that ignores the condition overwrites instead, and two
    precomputes that start within the same moment could both believe they hold the lock; one started later
    still sees the first one's lock and stops."""

    def __init__(self, url: str):
        self.fs, root = filesystem(url)
        self.key = f"{root}/{layout.LOCK}"
        self.path = f"{url.rstrip('/')}/{layout.LOCK}"

    def create(self, holder: dict) -> dict | None:
        try:
            self.fs.pipe_file(self.key, layout.dumps(holder).encode(), mode="create")
        except FileExistsError:
            pass
        return self.read()

    def read(self) -> dict | None:
        try:
            return parse_holder(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            pass


def writer_lock(location: str | Path) -> CacheLock:
    """The writer lock of ``cache.dir`` (its validation/ cache included): a file in the folder, or an object
    at the URL, so two precomputes into one bucket stop like two into one folder (``shards.lock``)."""
    return CacheLock(location, RemoteLockFile(str(location)) if is_url(location) else None)


def unfinished_hint(location: str | Path) -> str:
    """Why the cache at ``location`` (a folder or a URL) has no manifest, and what to run (the reader's error)."""
    run = f"`python -m precompute --config YOUR_CONFIG cache.dir={location}`"
    if is_url(location):
        url = str(location).rstrip("/")
        holder = RemoteLockFile(url).read()
        if holder is not None and holder_alive(holder) is False:
            return (f" (precompute stopped before it finished: {describe(holder)} is no longer running and its lock "
                    f"{url}/{layout.LOCK} is stale; rerun it on this cache, {run}: it takes the lock over and "
                    "resumes from what the store holds)")
        if holder is not None:
            return (f" (precompute is running: {describe(holder)} holds {url}/{layout.LOCK}; "
                    "the manifest is uploaded last)")
        return f" (run precompute first, or rerun it to finish: {run}; it resumes from what the store holds)"
    busy = lock_holder_message(location)
    if busy:
        return f" (precompute is running: {busy})"
    if (Path(location) / layout.PROGRESS_DIR).is_dir():
        return f" (precompute has not finished: rerun it on this cache, {run}; it resumes where it stopped)"
    return f" (run precompute first: {run})"


class UploadingWriter(CacheWriter):
    """A :class:`CacheWriter` on a local staging folder that uploads each part to ``url`` as it commits."""

    def __init__(self, url: str, staging: str | Path, *args, **kwargs):
        self.url = url
        self.fs, self.root = filesystem(url)
        staging = Path(staging)
        self._pull(staging)
        super().__init__(staging, *args, **kwargs)
        self.upload([f"{layout.PROGRESS_DIR}/records.json", f"{layout.TARGETS_DIR}/zarr.json"])

    # ---------------------------------------------------------------- transfer
    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _pull(self, staging: Path, at_start: bool = True) -> None:
        """Copy the store's commit records and metadata into ``staging`` (a resumed run on any machine)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            found = []
        # a commit record the store lacks (a crash before its upload) does not count: its part is redone. Only
        # at the start: later, a rank sharing this folder may be between committing a record and uploading it
        remote = {key[len(self.root) + 1:] for key in found}
        for record in (staging / layout.PROGRESS_DIR).glob("shard-*.json") if at_start else []:
            if record.relative_to(staging).as_posix() not in remote:
                record.unlink(missing_ok=True)
        for key in found:
            rel = key[len(self.root) + 1:] if key.startswith(self.root + "/") else None
            if rel is None or not (rel.endswith(METADATA_SUFFIXES) or rel.startswith(layout.DECODERS_DIR + "/")):
                continue
            if rel == layout.MANIFEST or rel.startswith(layout.VALIDATION_DIR + "/"):
                continue  # the manifest: rewritten by finalize, after everything else; validation/: its own cache
            target = staging / rel
            if not target.is_file():  # whole or not at all: ranks of one machine may share this folder
                with atomic_file(target) as tmp:
                    self.fs.get_file(key, str(tmp))

    def sync(self) -> None:
        """Fetch what other ranks committed meanwhile (their anchor declarations) from the store."""
        self._pull(self.cache_dir, at_start=False)

    def upload(self, rels: list[str]) -> None:
        """Put the staged files ``rels`` into the store, in this order (a commit record after its data)."""
        for rel in rels:
            self.fs.put_file(str(self.cache_dir / rel), self._remote(rel))

    def _retract(self, record: str) -> None:
        """Remove a part's commit record from the store before its data is rewritten: a crash in between
        must not leave an old record over new data."""
        if self.fs.exists(self._remote(record)):
            self.fs.rm_file(self._remote(record))

    def _remote_size(self, rel: str) -> int | None:
        try:
            return int(self.fs.info(self._remote(rel))["size"])
        except FileNotFoundError:
            return None

    # ------------------------------------------------------- the writer's parts
    def declare_anchor(self, anchor: str, *args, **kwargs) -> None:
        super().declare_anchor(anchor, *args, **kwargs)
        group = self.cache_dir / layout.TARGETS_DIR / anchor
        metadata = sorted(p.relative_to(self.cache_dir).as_posix() for p in group.rglob("zarr.json"))
        decoders = [f"{layout.DECODERS_DIR}/{d}" for d in self.declaration(anchor)["decoders"]]
        self.upload(metadata + decoders + [layout.declaration_name(anchor)])

    def write_samples(self, shard_id: int) -> None:
        self._retract(layout.samples_progress_name(shard_id))
        super().write_samples(shard_id)
        tar = layout.tar_name(shard_id)
        self.upload([tar, layout.samples_progress_name(shard_id)])  # the record last
        (self.cache_dir / tar).unlink()

    def write_targets(self, shard_id: int, anchor: str, arrays) -> None:
        record = layout.targets_progress_name(shard_id, anchor)
        self._retract(record)
        super().write_targets(shard_id, anchor, arrays)
        files = [st["file"] for a in layout.read_json(self.cache_dir / record)["arrays"].values()
                 for st in a["stored"].values()]
        self.upload(files + [record])  # the record last
        for f in files:
            (self.cache_dir / f).unlink()

    def shard_done(self, shard_id: int, anchor: str | None = None) -> bool:
        tar = layout.tar_name(shard_id)
        if anchor is not None or (self.cache_dir / tar).exists():
            return super().shard_done(shard_id, anchor)
        record = self.cache_dir / layout.samples_progress_name(shard_id)
        if not record.exists():
            return False
        # the tar went to the store: it counts if the store holds it whole, for the same records
        prog = layout.read_json(record)
        if [(s["index"], s["id"]) for s in prog["samples"]] != [(r.index, r.id) for r in self.shard_records(shard_id)]:
            raise CacheMismatchError(f"{self._remote(tar)} holds other records than this run's shard {shard_id}; "
                                     f"use a new cache.dir")
        return self._remote_size(tar) == prog["bytes"]

    def finalize(self) -> dict:
        manifest = super().finalize()
        self.upload([layout.MANIFEST])
        return manifest


def open_writer(location: str | Path, *args, staging: str | Path | None = None, local_dir: str | Path | None = None,
                **kwargs) -> CacheWriter:
    """The writer for ``cache.dir``: a local :class:`CacheWriter`, or for a URL an :class:`UploadingWriter` whose
    staging folder is ``staging`` (default: under ``local_dir``, see :func:`local_home`)."""
    if is_url(location):
        return UploadingWriter(str(location), staging or staging_dir(str(location), local_dir), *args, **kwargs)
    return CacheWriter(location, *args, **kwargs)
