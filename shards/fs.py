"""Files written so a crash never leaves half of one, and their checksums: one copy for both phases.

- :func:`atomic_file`: write a single file through a temporary name beside it, renamed into place
  only once complete (``torch.save``, ``torch.export.save``, JSON, ...);
- :func:`atomic_dir`: the same for a folder (a saved model, a tiny test checkpoint folder);
- :func:`sha256_file`: the sha256 of a file, or of every file of a folder.

The cache's own small files (manifest, commit records) go through ``shards.layout.atomic_write``,
which also fsyncs: a commit record must survive a power cut, a checkpoint file can be rewritten.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block completes.

    The temporary name carries the process id, so two ranks writing the same file never
    interleave: each renames a whole file, and the last rename wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
