"""DINO head (the reference's): one learned query per cached DINOv2 token attends over the thoughts; MSE x 0.5.

Front end: :class:`~trainer.heads.attention.ThoughtQueries` with ``tokens`` queries
(CLS + patches, 1025 for ViT-L/14 at 448), 8 heads, width = the feature width. The
attention output is the prediction itself, compared with the cached final-norm tokens.
"""
from __future__ import annotations

import torch

from .attention import ThoughtQueries
from .base import AnchorHead, DimsSource

NUM_HEADS = 8
LOSS_SCALE = 0.5


class DinoHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "dino"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        d = self.dims
        self.attend = ThoughtQueries(self.hidden_size, d["dim"], num_queries=d["tokens"], num_heads=NUM_HEADS)

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None, views=None) -> torch.Tensor:
        """Predicted features (B, tokens, dim)."""
        return self.attend(thoughts)

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.target(targets, "features", prediction.shape[0])
        return self.row_means((prediction.float() - features.float()).square()) * LOSS_SCALE
