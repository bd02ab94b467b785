"""Depth head (the reference's DepthReconstructor): each thought token is a kernel over one cached layer.

No attention: ``depth_token_generator`` (Linear(h, h), GELU, Linear(h, dim)) maps each of
the 4 thought tokens to a feature-width vector; token l is dotted with layer l's cached
patch features (Depth Anything V2's 4 DPT layers, in the DPT's order), giving one
score map per layer on the patch grid; the maps are upsampled (bilinear,
align_corners=False) to the depth map's size and averaged. Loss: L1 to the cached raw
relative depth (the DPT head's output after ReLU), times 0.005. Reference:
covt_qwen2_5_vl.py 926-947 (reconstructor), 1600-1620 (use), 316-330 (loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnchorHead, DimsSource

LOSS_SCALE = 0.005


class DepthHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "depth"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        d = self.dims
        if d["layers"] != self.num_tokens:
            raise ValueError(f"{anchor} head: one token per cached layer, but the cache has {d['layers']} layers "
                             f"for {self.num_tokens} tokens")
        self.grid = math.isqrt(d["patches"])
        if self.grid * self.grid != d["patches"]:
            raise ValueError(f"{anchor}/features: {d['patches']} patches is not a square grid "
                             f"(expected patch tokens only, no CLS)")
        self.map_size = (d["map_h"], d["map_w"])
        # the name carries none of the projection-lr name parts: the base lr when it trains; the reference's
        # peft froze it (train.trained_head_parameters: projection_query_attention keeps it at its init)
        self.depth_token_generator = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, d["dim"]))

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None, views=None) -> torch.Tensor:
        """Predicted raw relative depth (B, map_h, map_w)."""
        b = thoughts.shape[0]
        kernels = self.depth_token_generator(thoughts)  # (B, layers, dim)
        features = self.target(targets, "features", b).to(kernels.dtype)  # (B, layers, patches, dim)
        scores = torch.einsum("bld,blpd->blp", kernels, features).reshape(b, -1, self.grid, self.grid)
        maps = F.interpolate(scores, size=self.map_size, mode="bilinear", align_corners=False)
        return maps.mean(1)

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        depth = self.target(targets, "depth", prediction.shape[0])
        return self.row_means((prediction.float() - depth.float()).abs()) * LOSS_SCALE
