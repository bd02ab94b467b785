"""What every anchor head shares: the interface, the frozen-decoder holder, resizing, error messages.

A head turns the last-layer hidden states at one anchor's pad positions
("visual thoughts", ``(B, tokens, hidden)``) into that anchor's prediction and
compares it with the cached targets. Sizes come from the cache's recorded
dimensions (``cache.dims(anchor)``), never from constants here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covt.anchors import array_shape, get_anchor
from covt.images import square_view


class DimsSource(Protocol):
    """What a head needs from a cache: dimension sizes per anchor and where the frozen decoders are."""

    decoders_dir: Path

    def dims(self, anchor: str) -> dict[str, int]: ...


@dataclasses.dataclass
class CacheDims:
    """A :class:`DimsSource` without a cache, e.g. to rebuild saved heads from ``covt_heads.json``."""

    dims_by_anchor: dict[str, dict[str, int]]
    decoders_dir: Path

    def dims(self, anchor: str) -> dict[str, int]:
        try:
            return dict(self.dims_by_anchor[anchor])
        except KeyError:
            raise KeyError(f"no dimension sizes recorded for anchor {anchor!r} "
                           f"(have {sorted(self.dims_by_anchor)})") from None


def head_views(images: list, size: int) -> torch.Tensor:
    """The square views of ``images`` (PIL) a head with ``view_size = size`` reads: (B, 3, size, size) uint8."""
    if not images:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack([square_view(image, size) for image in images])).permute(0, 3, 1, 2).contiguous()


class AnchorHead(nn.Module):
    """One anchor's head and loss.

    ``forward(thoughts, targets, views)`` returns the scalar loss; ``decode`` returns
    the prediction itself (for visualisation and tests).
    """

    anchor: str
    #: side of the square uint8 views the head needs (None: no views)
    view_size: int | None = None
    #: the frozen decoder the head runs (SAM's mask decoder, PIDINet's stage 1), built on first use
    frozen: FrozenDecoder | None = None
    #: train.compile_heads: :meth:`decode` and :meth:`row_losses` through torch.compile (:meth:`compile_parts`)
    compiled_parts: tuple[Callable, Callable] | None = None

    def __init__(self, anchor: str, hidden_size: int, dims: dict[str, int]):
        super().__init__()
        self.anchor = anchor
        self.hidden_size = int(hidden_size)
        self.dims = {k: int(v) for k, v in dims.items()}
        self.num_tokens = get_anchor(anchor).tokens
        for array in get_anchor(anchor).arrays:  # fail now, naming the missing dim, not mid-training
            array_shape(anchor, array.name, self.dims)

    @property
    def decoder_files(self) -> list[Path]:
        """Frozen decoder files this head loads (to copy beside saved heads)."""
        return []

    def build_frozen_decoder(self) -> None:
        """The frozen decoder built now, on the head's device, rather than at its first use (CoVTModel.compile_heads:
        traced there, torch.export's unflatten recompiles once per parameter name)."""
        param = next(self.parameters(), None)
        if param is not None:
            self.build_on(param.device)

    def build_on(self, device: torch.device) -> None:
        """What the head would otherwise make at its first forward on ``device``: its frozen decoder."""
        if self.frozen is not None:
            self.frozen.on(device)

    def compile_parts(self) -> None:
        """train.compile_heads: the frozen decoder built, then :meth:`decode` and :meth:`row_losses` compiled, each at
        its first shapes. They are each head class's own methods: dynamo's recompile limit (8 variants per function)
        counts every head's variants against the function compiled, which one forward shared by six heads passed
        (every head then ran eager)."""
        self.build_frozen_decoder()
        self.compiled_parts = (torch.compile(self.decode), torch.compile(self.row_losses))

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None, views: torch.Tensor | None = None):
        raise NotImplementedError

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of each row (sample), ``(B,)``: the head's loss is their mean."""
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.row_losses(prediction, targets).mean()

    def forward(self, thoughts: torch.Tensor, targets: dict[str, torch.Tensor],
                views: torch.Tensor | None = None, *, per_row: bool = False, compiled: bool = False) -> torch.Tensor:
        """The loss, or with ``per_row`` each row's (:meth:`row_losses`); ``compiled``: through the compiled parts
        (:meth:`compile_parts`, which must have run)."""
        self.check_thoughts(thoughts)
        if thoughts.shape[0] == 0:
            raise ValueError(f"{self.anchor} head: no thoughts to score (a micro-batch without this anchor's "
                             "thoughts runs the head on CoVTModel.placeholder_part instead)")
        if compiled and self.compiled_parts is None:
            raise RuntimeError(f"{self.anchor} head: compiled=True before compile_parts()")
        decode, row_losses = self.compiled_parts if compiled else (self.decode, self.row_losses)
        losses = row_losses(decode(thoughts, targets, views), targets)
        return losses if per_row else losses.mean()

    def zero_targets(self, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """All-zero targets (every cached array at the cache's shape) and views for ``batch`` rows: what the
        head runs on when it has nothing to score but must still produce (zero) gradients."""
        targets = {array.name: torch.zeros((batch, *array_shape(self.anchor, array.name, self.dims)))
                   for array in get_anchor(self.anchor).arrays}
        views = torch.zeros((batch, 3, self.view_size, self.view_size), dtype=torch.uint8) if self.view_size else None
        return targets, views

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def row_means(values: torch.Tensor) -> torch.Tensor:
        """Each row's mean of ``values`` (B, ...): with rows of one size, their mean is the mean of all."""
        return values.flatten(1).mean(1)

    def check_thoughts(self, thoughts: torch.Tensor) -> None:
        expected = (self.num_tokens, self.hidden_size)
        if thoughts.dim() != 3 or tuple(thoughts.shape[1:]) != expected:
            raise ValueError(f"{self.anchor} head: thoughts must be (B, {expected[0]}, {expected[1]}), "
                             f"got {tuple(thoughts.shape)}")

    def target(self, targets: dict | None, array: str, batch: int) -> torch.Tensor:
        """``targets[array]`` checked against the cache's shape for that array."""
        if targets is None or array not in targets:
            raise KeyError(f"{self.anchor} head needs target array {array!r} "
                           f"(got {sorted(targets) if targets else None})")
        value = targets[array]
        shape = (batch, *array_shape(self.anchor, array, self.dims))
        if tuple(value.shape) != shape:
            raise ValueError(f"{self.anchor}/{array}: target shape {tuple(value.shape)} does not match "
                             f"the cache's dims {shape}")
        return value


M = TypeVar("M", bound=nn.Module)


class FrozenDecoder(Generic[M]):
    """A frozen module held OUTSIDE the head's module tree, built lazily per device.

    Why outside the tree: the frozen decoders (SAM's prompt encoder + mask
    decoder, PIDINet's first stage) must get no optimizer state, must not be cast
    to bf16 by ``model.bfloat16()`` / DeepSpeed's bf16 mode (SAM's positional
    encoding loses precision in bf16), must not be partitioned by ZeRO-3 (which
    would all-gather them every step for nothing) and must not land in the
    saved heads' state dict (they are copied as files from the cache). Keeping
    them out of ``nn.Module._modules`` does all four at once. Why lazy: modules
    built inside ``deepspeed.zero.Init`` get their parameters partitioned at
    construction; at the first forward that context has been left. Files are
    read and checked eagerly (``load``), so a bad file fails at build time.
    """

    def __init__(self, name: str, build: Callable[[torch.device], M]):
        self.name = name
        self._build = build
        self._on_device: dict[torch.device, M] = {}

    def on(self, device: torch.device) -> M:
        device = torch.device(device)
        if device not in self._on_device:
            module = self._build(device)  # the builder puts it in eval mode (exported programs have no .eval())
            module.requires_grad_(False)
            self._on_device[device] = module
        return self._on_device[device]

    def __repr__(self) -> str:
        return f"FrozenDecoder({self.name}, built on {list(map(str, self._on_device))})"


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` maps to ``size`` (no-op if already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def missing_decoder_error(anchor: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{anchor} head: frozen decoder file not found: {path}\n"
        f"  precompute writes it into the cache's decoders/ folder when anchor {anchor!r} is computed;\n"
        f"  rerun precompute with {anchor!r} in `anchors`, or point cache.dir at a cache that has it")
