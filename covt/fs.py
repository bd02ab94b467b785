"""Files written so a crash never leaves half of one, a full disk said as such, and checksums: one copy
of each for both phases.

- :func:`atomic_write`: bytes, fsynced, for the records that say what is committed (the cache's manifest
  and commit records, metrics.jsonl): they must survive a power cut;
- :func:`atomic_file`: any single file written through a temporary name beside it, renamed into place
  only once complete (``torch.save``, ``torch.export.save``, JSON, ...);
- :func:`atomic_save`: a serialiser's output (``torch.save``, ``torch.export.save``) built in memory, then
  written through :func:`atomic_file`: same data, same bytes, and a full disk is a :class:`DiskFullError`;
- :func:`atomic_dir`: the same for a folder (a saved model, a tiny checkpoint folder);
- :func:`naming_disk_full`: a write that failed for lack of space becomes a :class:`DiskFullError`
  naming the file and saying that rerunning resumes;
- :func:`sha256_file`: the sha256 of a file, or of every file of a folder.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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
    with naming_disk_full(path), open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block completes.

    The temporary name carries the process id, so two ranks writing the same file never
    interleave: each renames a whole file, and the last rename wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: writers that check it (torch.export.save wants .pt2) see the real one
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(path: str | Path, save: Callable[[io.BytesIO], object]) -> None:
    """``save(buffer)`` into memory, then the bytes to ``path`` atomically.

    Why not ``save(tmp_path)``: torch's zip writer names the archive's inner folder after the file it
    writes (here a temporary name with the pid: two writes of the same data differed), and on a full disk
    it aborts the whole process from C++ (``terminate called``) instead of raising.
    """
    buffer = io.BytesIO()
    save(buffer)
    with naming_disk_full(path), atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


@contextmanager
def atomic_dir(path: str | Path, tmp_prefix: str = ".tmp-") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block completes.

    ``tmp_prefix`` starts the temporary folder's name, so a caller can find and remove the
    leftovers of an interrupted write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes; of a folder, of every file's relative path and bytes, sorted by path."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():
        _update_from_file(h, path, block)
        return h.hexdigest()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        _update_from_file(h, f, block)
    return h.hexdigest()


def _update_from_file(h, path: Path, block: int) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)


# ------------------------------------------------------------------ disk full
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_FREE_BYTES = 1 << 20  # below this, a failed write (torch.save raises RuntimeError) is a full disk


class DiskFullError(OSError):
    """No space left while writing; says where, and that rerunning resumes."""


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


@contextmanager
def naming_disk_full(path: str | Path, resume: str = "it resumes from what was committed"):
    """Turn a write that failed for lack of space into a :class:`DiskFullError` naming ``path``.

    Some writers report a full disk without an errno: torch.save's zip writer as a RuntimeError, safetensors
    as a ``SafetensorError`` saying ``(os error 28)``; those count too, as does a failure of either with
    almost no free space left at ``path``.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        full = getattr(e, "errno", None) in DISK_FULL_ERRNOS or any(f"(os error {n})" in str(e)
                                                                    for n in DISK_FULL_ERRNOS)
        if not full:
            free = _free_bytes(Path(path))
            full = free is not None and free < DISK_FULL_FREE_BYTES
        if not full:
            raise
        raise DiskFullError(errno.ENOSPC, f"disk full: no space left on device while writing {path} ({e}). "
                                          f"Free space there, then rerun the same command: {resume}") from e
