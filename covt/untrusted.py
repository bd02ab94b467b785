"""Loading files someone else wrote (a colleague's checkpoint, a cache in a shared bucket) runs no code.

``torch.load`` with ``weights_only=False`` and ``torch.export.load`` unpickle, and unpickling can call any
function. Here:

- :func:`load_plain`: ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts
  only; anything else is an :class:`UnsafeFileError` naming the file, raised before any of it runs;
- :func:`check_pickle_globals`: for files another library unpickles in full (DeepSpeed's checkpoint), the
  pickle's opcodes are read without running any and every object it would build must be on an allow-list;
- :func:`load_exported_program`: a ``torch.export`` archive (``.pt2``) is opened only if every payload in it
  is raw tensor data or JSON (:func:`check_export_archive`); ``torch.export.load`` itself falls back to full
  pickle for pickled weights, constants and sample inputs, so an archive holding any is refused.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A file that could only be loaded by running code it carries (a pickle of arbitrary objects)."""


def load_plain(path: str | Path, what: str = "file") -> Any:
    """``path`` loaded as tensors and plain data only (``torch.load(weights_only=True)``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: {what} holds objects other than tensors and plain data; refused without "
                              f"loading it (unpickling would run code it carries): {str(e).splitlines()[0]}") from None


def check_pickle_globals(path: str | Path, allowed: set[str], what: str = "file") -> None:
    """Refuse ``path`` if unpickling it would call anything but torch's plain types and ``allowed``
    (``module.name`` strings); nothing in it runs here (the opcodes are only read)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a torch zip archive: nothing to judge it by
        raise UnsafeFileError(f"{path}: {what} is not a torch checkpoint archive ({e}); refused without "
                              f"loading it") from None
    unexpected = sorted(set(needed) - allowed)
    if unexpected:
        raise UnsafeFileError(f"{path}: {what} would build {unexpected} when unpickled (allowed: tensors, plain "
                              f"data and {sorted(allowed)}); refused without loading it")


def _refuse(path: Path, why: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: refused, a torch.export archive whose loading would unpickle: {why}")


def check_export_archive(path: str | Path) -> None:
    """Every payload of the ``.pt2`` archive at ``path`` is raw tensor bytes or JSON, or loads as plain data."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise _refuse(path, f"not a zip archive ({e})") from None
    with archive:
        for name in archive.namelist():
            parts = name.split("/")
            folder = "/".join(parts[1:-1])
            if folder in ("data/weights", "data/constants") and parts[-1].endswith("_config.json"):
                _check_payload_config(path, name, json.loads(archive.read(name)))
            elif folder in ("data/weights", "data/constants") and parts[-1].endswith(".pt"):
                raise _refuse(path, f"{name} is a pickled state dict (legacy format)")
            elif folder.startswith("data/aotinductor"):
                raise _refuse(path, f"{name} is a compiled AOTInductor model")
            elif folder == "data/sample_inputs":
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except pickle.UnpicklingError:
                    raise _refuse(path, f"{name} holds objects other than tensors and plain data") from None


def _check_payload_config(path: Path, name: str, config: dict) -> None:
    for fqn, meta in config.get("config", {}).items():
        if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise _refuse(path, f"{name}: {fqn} is stored as a pickled object ({meta.get('path_name')})")


def load_exported_program(path: str | Path) -> torch.export.ExportedProgram:
    """``torch.export.load(path)`` after :func:`check_export_archive`."""
    check_export_archive(path)
    return torch.export.load(str(path))
