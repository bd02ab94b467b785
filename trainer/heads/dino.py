"""DINO head: learnable query vectors, one per cached DINOv2 token, cross-attend over the thoughts.

The thought tokens are projected to the feature width; each query (CLS + one
per patch) attends over them, and the result (plus the query itself, a
residual so a query can carry its position's typical feature) is normalised and
mapped linearly to the feature; MSE to the cached final-norm features.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import AnchorHead, DimsSource, QueryCrossAttention


class DinoHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "dino"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        d = self.dims
        self.queries = QueryCrossAttention(self.hidden_size, d["tokens"], d["dim"], d["dim"])

    def decode(self, thoughts: torch.Tensor, targets: Optional[dict] = None, views=None) -> torch.Tensor:
        """Predicted features (B, tokens, dim)."""
        return self.queries(thoughts)

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.target(targets, "features", prediction.shape[0])
        return F.mse_loss(prediction.float(), features.float())
