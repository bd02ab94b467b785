"""The local copy of a cache in object storage: files fetched on first use or ahead, bounded in size, and
shared by every process that reads through the same folder (a rank's DataLoader workers, and by default
the ranks of one machine), so each file is downloaded once per machine and the bound holds for all of them.

Start at :meth:`Mirror.path`. The processes coordinate with ``fcntl.flock`` on files of the copy itself:

- ``.locks/<hash of the file's name>``, one lock per cache file. A process downloading the file holds it
  exclusively (the others wait, then find the file). A process reading the file holds it shared while the
  file belongs to the shard it reads (its last ``pin_files`` files), and eviction deletes only files nobody
  holds: zarr reopens its shard files on every read, so a delete could pull a file from under a reader.
- ``.space.lock``, held while a process makes room for a download and reserves it, and while the download
  lands (its rename, which a directory scan could otherwise see under neither name). A download in progress
  is a ``.part`` file whose name carries its final size, so every process counts it before it lands.

The bound (``max_bytes``) covers the data files (tars and zarr shard files); commit records and zarr
metadata (``.json``, a few kB per shard) stay for the life of the copy. Eviction is least recently used
across processes: every use sets the file's mtime. A prefetch that does not fit is skipped; a file a reader
needs is fetched even if everything else is pinned, and a warning says the bound is too small (it must hold
about two shards per reading process: the one each reads and the next it moves to).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
SPACE_LOCK = ".space.lock"
PART_SUFFIX = ".part"
METADATA_SUFFIXES = (".json",)  # small files every process needs again and again: never evicted
SKIP_DIRS = {LOCKS_DIR, "progress"}  # no data files there: eviction does not walk them
PREFETCH_WAIT_S = 120.0  # how long a reader's download waits for prefetches under way to land before it overruns


def is_data(rel: str) -> bool:
    return not rel.endswith(METADATA_SUFFIXES)


def part_name(target: Path, size: int, required: bool) -> Path:
    """A download in progress: ``.NAME.SIZE.KIND.RANDOM.part`` beside its target (the size counts against the
    bound; KIND is ``r`` for a file a reader waits for, ``p`` for a prefetch)."""
    return target.with_name(f".{target.name}.{size}.{'r' if required else 'p'}.{uuid.uuid4().hex}{PART_SUFFIX}")


def parse_part(name: str) -> tuple[str, int, bool]:
    """(target name, reserved bytes, whether it is a prefetch) of a :func:`part_name`."""
    target, size, kind, _, _ = name[1:].rsplit(".", 4)
    return target, int(size), kind == "p"


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a forked child may still hold a copy of the descriptor
    os.close(fd)


class Mirror:
    """Read-only local copies of a remote cache's files (see the module docstring)."""

    def __init__(self, connect: Callable[[], tuple], local: Path, max_bytes: int, workers: int = 4,
                 pin_files: int = 64):
        """``connect()``: the fsspec filesystem and the cache's path in it, called again in a forked process
        (fsspec's async filesystems are not fork-safe); ``local``: the copy's folder."""
        self.connect, self.local = connect, Path(local)
        self.max_bytes = int(max_bytes)
        self.workers = workers
        self.pin_files = pin_files
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self.fs, self.root = self.connect()
        self._lock = threading.Lock()
        self._pins: OrderedDict[str, int] = OrderedDict()  # rel -> descriptor of its lock, held shared
        self._pending: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._warned = False

    def _check_fork(self) -> None:
        """A forked process (a DataLoader worker) starts with no pins and no threads of its own."""
        if self._pid != os.getpid():
            for fd in self._pins.values():
                os.close(fd)  # closing the child's copy leaves the parent's lock as it is
            self._reset()

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read_bytes(self, rel: str) -> bytes:
        """A small file's current bytes, straight from the store (the manifest: never a stale copy)."""
        return self.fs.cat_file(self.remote(rel))

    # ------------------------------------------------------------------ reading
    def path(self, rel: str) -> Path:
        """The local copy of ``rel``, downloaded now unless present (a download under way in any process is
        waited for); a data file stays pinned while among this process's last ``pin_files``. A file missing
        from the store gives a path that does not exist (callers report it as missing)."""
        self._check_fork()
        target = self.local / rel
        if not is_data(rel):
            if not target.is_file():
                self._download(rel)  # concurrent downloads of a small file: each lands whole (os.replace)
            return target
        with self._lock:
            fd = self._pins.pop(rel, None)
        if fd is None:
            fd = self._lock_fd(rel)
            fcntl.flock(fd, fcntl.LOCK_SH)
        if not target.is_file():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a conversion drops the shared lock first: two cannot deadlock
                if not target.is_file():
                    self._download(rel)
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                unlock(fd)
                raise
        if not target.is_file():
            unlock(fd)
            return target
        os.utime(target)  # least recently used, across processes
        with self._lock:
            self._pins[rel] = fd
            while len(self._pins) > self.pin_files:
                unlock(self._pins.popitem(last=False)[1])
        return target

    def prefetch(self, rels: list[str]) -> None:
        """Start downloading ``rels`` in background threads (those not here already or on their way)."""
        self._check_fork()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cache-prefetch")
            for rel in rels:
                if rel not in self._pending and not (self.local / rel).is_file():
                    self._pending[rel] = self._pool.submit(self._prefetch_one, rel)

    def _prefetch_one(self, rel: str) -> None:
        try:
            fd = self._lock_fd(rel)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: someone fetches or reads it already
                if not (self.local / rel).is_file():
                    self._download(rel, required=False)
            except BlockingIOError:
                pass
            finally:
                unlock(fd)
        except Exception as e:  # the reader's own path() fetches it again and raises
            log.debug("prefetching %s failed: %s", rel, e)
        finally:
            with self._lock:
                self._pending.pop(rel, None)

    def close(self) -> None:
        self._check_fork()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            while self._pins:
                unlock(self._pins.popitem()[1])

    # ------------------------------------------------------------- downloading
    def _lock_fd(self, rel: str) -> int:
        locks = self.local / LOCKS_DIR
        locks.mkdir(parents=True, exist_ok=True)
        return os.open(locks / hashlib.sha256(rel.encode()).hexdigest()[:24], os.O_RDWR | os.O_CREAT, 0o644)

    def _download(self, rel: str, required: bool = True) -> None:
        """Fetch ``rel`` (the caller holds its lock exclusively if it is a data file); nothing if it is missing
        from the store, or if it is not ``required`` (a prefetch) and does not fit."""
        try:
            size = int(self.fs.info(self.remote(rel))["size"])
        except FileNotFoundError:
            return
        target = self.local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        part = part_name(target, size, required)
        if is_data(rel) and not self._make_room(size, part, required):
            return
        try:
            self.fs.get_file(self.remote(rel), str(part))
            # a reader never sees half a file; under the space lock, a scan never misses the file between its two
            # names (and reserves its bytes again for another download: a bound overrun, seen in a test under load)
            with self._space() if is_data(rel) else contextlib.nullcontext():
                os.replace(part, target)
        except FileNotFoundError:
            pass
        finally:
            part.unlink(missing_ok=True)

    def _make_room(self, size: int, part: Path, required: bool) -> bool:
        """Evict least recently used unpinned data files until ``size`` more bytes fit, and reserve them
        (create ``part``). A prefetch that does not fit gives up (False). A reader's file waits for prefetches
        under way (once landed they can go), and past that is fetched anyway, with a warning."""
        self.local.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + PREFETCH_WAIT_S
        while True:
            with self._space():
                files, reserved, prefetching = self._scan()
                total = self._evict_lru(files, reserved + size)
                if total > self.max_bytes and not required:
                    return False
                if total <= self.max_bytes or not prefetching or time.monotonic() > deadline:
                    if total > self.max_bytes:
                        self._warn(total)
                    part.touch()  # reserved: every process counts it from now on
                    return True
            time.sleep(0.02)

    @contextlib.contextmanager
    def _space(self):
        """The local copy's space lock, held while a process makes room and reserves it, and while a download lands."""
        with open(self.local / SPACE_LOCK, "a") as space:
            fcntl.flock(space, fcntl.LOCK_EX)
            yield

    def _evict_lru(self, files: list[tuple[float, int, Path]], incoming: int) -> int:
        """Delete unpinned files, least recently used first, until ``incoming`` more bytes fit; the new total."""
        total = sum(s for _, s, _ in files) + incoming
        for _, file_size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if self._evict(path):
                total -= file_size
        return total

    def _warn(self, total: int) -> None:
        if not self._warned:
            self._warned = True
            log.warning("the local copy %s needs %.2f GB now, over cache.local_max_gb=%.2f: every older file is "
                        "being read; raise cache.local_max_gb to about two shards per loader worker", self.local,
                        total / (1 << 30), self.max_bytes / (1 << 30))

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int, bool]:
        """The data files here as (last use, bytes, path), the bytes reserved by downloads under way, and
        whether one of those is a prefetch (the ``.part`` files of a killed process are removed)."""
        files, reserved, prefetching = [], 0, False
        for folder, dirs, names in os.walk(self.local):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            for name in names:
                path = Path(folder) / name
                if name.endswith(PART_SUFFIX):
                    target, size, prefetch = parse_part(name)
                    if not is_data(target) or self._evict(path, path.with_name(target)):  # nobody downloads it
                        continue
                    reserved, prefetching = reserved + size, prefetching or prefetch
                elif is_data(name) and not name.startswith("."):
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, path))
        return files, reserved, prefetching

    def _evict(self, path: Path, owner: Path | None = None) -> bool:
        """Delete ``path`` unless a process holds the lock of ``owner`` (default: ``path`` itself)."""
        fd = self._lock_fd((owner or path).relative_to(self.local).as_posix())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            path.unlink(missing_ok=True)
            return True
        finally:
            unlock(fd)
