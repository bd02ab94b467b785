"""SigLIP / MetaCLIP head: one learnable query cross-attends over the thoughts; MSE to the pooled embedding."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import AnchorHead, DimsSource, QueryCrossAttention


class PooledEmbeddingHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        dim = self.dims["dim"]
        self.query = QueryCrossAttention(self.hidden_size, 1, dim, dim)

    def decode(self, thoughts: torch.Tensor, targets: Optional[dict] = None, views=None) -> torch.Tensor:
        """Predicted embedding (B, dim)."""
        return self.query(thoughts)[:, 0]

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        embedding = self.target(targets, "embedding", prediction.shape[0])
        return F.mse_loss(prediction.float(), embedding.float())
