"""Depth head: each thought token is a kernel over one cached Depth Anything V2 layer.

Token l (projected to the feature width) is dotted with layer l's cached patch
features, giving one map per layer on the patch grid; the maps are upsampled
(bilinear) to the depth map size and averaged; L1 to the cached relative depth
(min-max normalised to [0, 1]).

Normalisation that keeps it trainable: the patch features are layer-normalised
(no parameters) so the four layers have comparable scale whatever the backbone,
the dot product is divided by sqrt(dim), and a learnable scale and bias followed
by a sigmoid map the average into [0, 1], the range of the target (the sigmoid
starts at 0.5, the middle of it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnchorHead, DimsSource, TokenProjection, resize_maps


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
        self.feature_dim = d["dim"]
        self.map_size = (d["map_h"], d["map_w"])
        self.project = TokenProjection(self.hidden_size, self.feature_dim)
        # shape (1,), not (): DeepSpeed ZeRO-2 broadcasts parameters through a byte view, which 0-d tensors lack
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def decode(self, thoughts: torch.Tensor, targets: Optional[dict] = None, views=None) -> torch.Tensor:
        """Predicted depth (B, map_h, map_w) in [0, 1]."""
        b = thoughts.shape[0]
        kernels = self.project(thoughts)  # (B, layers, dim)
        features = self.target(targets, "features", b).to(kernels.dtype)
        features = F.layer_norm(features, (self.feature_dim,))
        maps = torch.einsum("bld,blpd->blp", kernels, features) / math.sqrt(self.feature_dim)
        maps = resize_maps(maps.reshape(b, -1, self.grid, self.grid), self.map_size).mean(1)
        return torch.sigmoid(maps.float() * self.scale + self.bias)

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        depth = self.target(targets, "depth", prediction.shape[0])
        return F.l1_loss(prediction, depth.float())
