"""One writer per cache: ``CACHE/writer.lock`` names the precompute writing it (host, pid, start time).

Precompute holds the lock from before its first write until the manifest is written
(:class:`CacheLock`). The ranks of one launch share it (the lock records the launch's
job id, and every rank of that job may enter); another precompute on the same cache
stops at once naming the holder. A lock whose process is dead on this host is stale
(a killed run) and is taken over. Readers use :func:`lock_holder_message` (and
``shards.storage.unfinished_hint``) to say that precompute is still running or has not
finished, and what to run. The trainer locks its run folder the same way (``LockFile(out, name)``,
``CacheLock(..., what="training")``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from shards import layout

log = logging.getLogger(__name__)


class CacheBusyError(RuntimeError):
    """Another precompute holds the cache's writer lock."""


def job_id() -> str:
    """Identifies one launch: every rank of a torchrun/deepspeed job gets the same id."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return f"{env.get('TORCHELASTIC_RUN_ID', 'job')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    return f"{socket.gethostname()}:{os.getpid()}"


READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
UNKNOWN_HOLDER = {"host": "?", "pid": -1, "started": "?", "job": "?"}  # what an unreadable lock names


def parse_holder(raw: bytes | str) -> dict:
    """The holder a lock's bytes name (unparsable bytes name an unknown holder)."""
    try:
        return json.loads(raw)
    except ValueError:
        return dict(UNKNOWN_HOLDER)


def read_holder(cache_dir: str | Path, name: str = layout.LOCK) -> dict | None:
    """What the lock file says, or None if there is none (an unreadable one names an unknown holder)."""
    path = Path(cache_dir) / name
    try:
        return parse_holder(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        return dict(UNKNOWN_HOLDER)


def holder_alive(holder: dict) -> bool | None:
    """True/False for a holder on this host; None when it runs elsewhere (cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, ValueError, KeyError):
        return False
    return True


def describe(holder: dict) -> str:
    what = holder.get("what", "precompute")
    return f"{what} on host {holder.get('host')} (pid {holder.get('pid')}, started {holder.get('started')})"


def live_holder(cache_dir: str | Path) -> dict | None:
    """The holder of the lock unless there is none or it is dead (a stale lock)."""
    holder = read_holder(cache_dir)
    if holder is None or holder_alive(holder) is False:
        return None
    return holder


def lock_holder_message(cache_dir: str | Path) -> str | None:
    holder = live_holder(cache_dir)
    if holder is None:
        return None
    return (f"{describe(holder)} is writing this cache now; wait until it has finished (if that process is "
            f"gone, delete {Path(cache_dir) / layout.LOCK})")


class LockFile:
    """The lock of a local cache folder: ``CACHE/writer.lock``. ``shards.storage.RemoteLockFile`` is the same
    for a cache at a URL (an object created only if absent); :class:`CacheLock` works with either."""

    def __init__(self, cache_dir: str | Path, name: str = layout.LOCK):
        self.cache_dir = Path(cache_dir)
        self.name = name
        self.path = self.cache_dir / name

    def __str__(self) -> str:
        return str(self.path)

    def create(self, holder: dict) -> dict | None:
        """Create the lock naming ``holder`` unless it exists; return who it names now (None: unreadable)."""
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise NotADirectoryError(f"{self.cache_dir} is a file; a folder belongs there (move the file or choose "
                                     f"another folder)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return layout.create_exclusive_json(self.path, holder)
        except OSError as e:
            if e.errno in READ_ONLY_ERRNOS:
                raise PermissionError(e.errno, f"cannot create the lock {self.path}: {e.strerror}. The folder is "
                                               f"read-only here; a finished cache needs no rerun (`python -m shards "
                                               f"inspect {self.cache_dir}` shows what it holds)") from None
            return None  # an unreadable leftover: judged like any holder
        except ValueError:
            return None

    def read(self) -> dict | None:
        return read_holder(self.cache_dir, self.name)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class CacheLock:
    """``with CacheLock(cache_dir):`` hold the writer lock of ``cache_dir`` (see the module docstring);
    ``lock_file`` replaces the local ``CACHE/writer.lock`` (a cache at a URL: ``shards.storage``); ``what``
    names the kind of process that holds it (``precompute``, ``training``), ``rule`` says why one at a time."""

    def __init__(self, cache_dir: str | Path, lock_file: LockFile | None = None, what: str = "precompute",
                 rule: str = "one precompute per cache"):
        self.cache_dir = cache_dir
        self.file = lock_file or LockFile(cache_dir)
        self.rule = rule
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": job_id(), "what": what}
        self.owner = False

    def acquire(self) -> None:
        for _ in range(3):
            if self.file.create(self.me) == self.me:
                self.owner = True
                return
            holder = self.file.read()
            if holder is None:  # released between the two looks: try again
                continue
            if holder.get("job") == self.me["job"]:
                return  # another rank of this launch created it
            if holder_alive(holder) is False:
                log.warning("removing the stale writer lock of %s (that process is dead): %s",
                            describe(holder), self.file)
                self.file.remove()
                continue
            raise CacheBusyError(
                f"{self.cache_dir} is being written by {describe(holder)}: {self.rule}. Wait for "
                f"it to finish; if that process is gone (e.g. it ran on another machine), delete {self.file} "
                f"and rerun")
        raise CacheBusyError(f"could not take the writer lock {self.file}: it keeps changing hands")

    def release(self) -> None:
        if self.owner and self.file.read() == self.me:
            self.file.remove()
        self.owner = False

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
