"""What every anchor model of the precompute phase provides.

An anchor model is a frozen vision expert wrapped so the driver can treat all of
them alike: it says the square input side it wants, the sizes of the named
dimensions of its target arrays (see ``covt.anchors``), computes a batch of
targets from square views, exports the frozen decoders the training loss needs,
and fingerprints its checkpoint for the manifest.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from covt.config import CheckpointConfig
from covt.fs import sha256_file


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint file the config points at does not exist."""

    def __init__(self, anchor: str, path: str, config_key: str, where_to_get: str):
        super().__init__(
            f"{anchor}: checkpoint not found: {path}\n"
            f"  (set by config key {config_key})\n"
            f"  get it from: {where_to_get}"
        )


def to_host(targets: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``targets`` as numpy arrays on the CPU. From a GPU, each goes into page-locked memory with the copies queued
    together and one wait at the end: copies into pageable numpy memory ran at 1.5 GB/s on an H100 host and took
    three quarters of Depth Anything's ``compute`` (BENCHMARKS.md). Torch's host allocator caches the page-locked
    blocks, which return to it when the arrays are dropped."""
    out, copied = {}, False
    for name, t in targets.items():
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out[name], copied = host.copy_(t, non_blocking=True), True
        else:
            out[name] = t.contiguous()
    if copied:
        torch.cuda.current_stream().synchronize()
    return {name: t.numpy() for name, t in out.items()}


class AnchorModel(torch.nn.Module, abc.ABC):
    name: ClassVar[str]

    #: side of the square view this anchor computes from (the driver resizes the
    #: original image straight to it with ``covt.images.square_view``)
    input_size: int
    #: the attribute holding the network that ``precompute.compile_anchors`` compiles (None: the anchor has
    #: switches of its own, as SAM's ``precompute.sam.compile_encoder`` / ``compile_decoder``)
    network: ClassVar[str | None] = "model"

    def compile_network(self) -> None:
        """The anchor's network through torch.compile, in place (``nn.Module.compile``: the same parameters under
        the same names), compiled on its first batch."""
        if self.network is None:
            raise ValueError(f"precompute.compile_anchors: {self.name} is compiled by switches of its own")
        getattr(self, self.network).compile()

    @abc.abstractmethod
    def dims(self) -> dict[str, int]:
        """Sizes of the named dimensions of this anchor's target arrays."""

    @abc.abstractmethod
    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        """Targets for a batch.

        ``views``: uint8 ``(B, S, S, 3)`` RGB square views, ``S = input_size``, on
        the anchor's device. Returns one array per target array of the spec,
        each ``(B, *shape)``: float32 for ``float``, bool for ``mask``, int32 for
        ``count``, on the CPU.
        """

    def export_decoders(self, out_dir: Path) -> list[str]:
        """Write the frozen pieces the training loss needs into ``out_dir``; return file names."""
        return []

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """Checkpoint hash, preprocessing and versions, for the manifest."""

    def checkpoint_fields(self, path: str | Path) -> dict:
        """``checkpoint`` and ``sha256`` entries of a fingerprint; hashed once (real checkpoints are GBs)."""
        if getattr(self, "_checkpoint_sha256", None) is None:
            self._checkpoint_sha256 = sha256_file(path)
        return {"checkpoint": str(path), "sha256": self._checkpoint_sha256}


def checkpoint_file(anchor: str, ckpt: CheckpointConfig, where_to_get: str,
                    write_random: Callable[[Path, int], None] | None = None) -> Path:
    """The checkpoint file ``ckpt.path``; if it is missing, a seeded random one written by ``write_random``
    when the config asks for it (tiny default), else a :class:`MissingCheckpointError`."""
    path = Path(ckpt.path)
    if not path.is_file():
        if ckpt.random_init_seed is None or write_random is None:
            raise MissingCheckpointError(anchor, str(path), f"precompute.checkpoints.{anchor}.path", where_to_get)
        write_random(path, ckpt.random_init_seed)
    return path
