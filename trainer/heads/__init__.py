"""Anchor heads: decode visual-thought hidden states and score them against cached targets.

``build_heads(anchors, hidden_size, cache)`` gives one :class:`AnchorHead` per
anchor, sized from ``cache.dims(anchor)`` and loading frozen decoders from
``cache.decoders_dir``. ``head(thoughts, targets, views)`` is the scalar loss;
``head.decode(thoughts, targets, views)`` the prediction. Every head computes what CoVT's
reference computes (checked by tests/test_reference_heads.py against the reference's own
functions); parameter names follow the reference's optimizer rule (:func:`uses_projection_lr`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from covt.anchors import get_anchor

from .attention import PROJECTION_LR_NAME_PARTS, uses_projection_lr
from .base import AnchorHead, CacheDims, DimsSource
from .clip import PooledEmbeddingHead
from .depth import DepthHead
from .dino import DinoHead
from .pidinet import PidinetHead
from .sam import SamHead

HEADS: dict[str, Callable[[int, DimsSource, str], AnchorHead]] = {
    "sam": SamHead,
    "depth": DepthHead,
    "dino": DinoHead,
    "pidinet": PidinetHead,
    "siglip": PooledEmbeddingHead,
    "metaclip": PooledEmbeddingHead,
}


def build_heads(anchors: Iterable[str], hidden_size: int, cache: DimsSource) -> nn.ModuleDict:
    heads = nn.ModuleDict()
    for anchor in anchors:
        get_anchor(anchor)  # unknown names fail with the registry's message
        if anchor not in HEADS:
            raise KeyError(f"no head for anchor {anchor!r} (heads exist for {sorted(HEADS)})")
        heads[anchor] = HEADS[anchor](int(hidden_size), cache, anchor)
    return heads


def init_like_missing_keys(heads: nn.ModuleDict, std: float) -> None:
    """Initialise as transformers initialises the reference's heads, missing keys of its checkpoint: every
    Linear (attention out-projections included) N(0, std) with zero bias (Qwen2.5-VL's ``_init_weights``);
    the attention in-projections and the randn queries stay as built."""
    with torch.no_grad():
        for module in heads.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def heads_metadata(heads: nn.ModuleDict) -> dict:
    """What rebuilding ``heads`` needs besides their state dict (for ``covt_heads.json``).

    Rebuild with ``build_heads(meta["anchors"], meta["hidden_size"], CacheDims(meta["dims"], folder))``
    where ``folder`` holds copies of ``meta["decoder_files"]``.
    """
    return {
        "anchors": list(heads.keys()),
        "hidden_size": next(iter(heads.values())).hidden_size if len(heads) else None,
        "dims": {name: dict(head.dims) for name, head in heads.items()},
        "decoder_files": sorted({f.name for f in decoder_files(heads)}),
    }


def decoder_files(heads: nn.ModuleDict) -> list[Path]:
    """Frozen decoder files the heads load (copy them beside saved heads)."""
    return sorted({Path(f) for head in heads.values() for f in head.decoder_files})


__all__ = ["AnchorHead", "CacheDims", "DimsSource", "HEADS", "PROJECTION_LR_NAME_PARTS", "build_heads",
           "decoder_files", "heads_metadata", "init_like_missing_keys", "uses_projection_lr"]
