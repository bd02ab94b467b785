"""Anchor models of the precompute phase: ``LOADERS`` maps each anchor to the function that loads it.

The trainer's heads use the same explicit table (``trainer.heads.HEADS``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from covt.config import CheckpointConfig, PrecomputeConfig

from .base import AnchorModel
from .clip import load_metaclip, load_siglip
from .depth import load_depth
from .dino import load_dino
from .pidinet import load_pidinet
from .sam import load_sam

AnchorLoader = Callable[[CheckpointConfig, PrecomputeConfig, torch.device], AnchorModel]
#: anchor name -> function building its model from its checkpoint config
LOADERS: dict[str, AnchorLoader] = {
    "sam": load_sam,
    "depth": load_depth,
    "dino": load_dino,
    "pidinet": load_pidinet,
    "siglip": load_siglip,
    "metaclip": load_metaclip,
}


def load_anchor(name: str, pre: PrecomputeConfig, device: torch.device) -> AnchorModel:
    if name not in LOADERS:
        raise KeyError(f"no precompute loader for anchor {name!r} (have {sorted(LOADERS)})")
    if name not in pre.checkpoints:
        raise KeyError(f"precompute.checkpoints.{name} is not set: where is the {name} checkpoint?")
    if pre.checkpoints[name].input_size is not None and name != "pidinet":
        raise ValueError(f"precompute.checkpoints.{name}.input_size: only pidinet's view size can be set "
                         f"(the others compute at their model's own input size)")
    anchor = LOADERS[name](pre.checkpoints[name], pre, device)
    if name in pre.compile_anchors:
        anchor.compile_network()
    return anchor
