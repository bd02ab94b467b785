"""SigLIP / MetaCLIP head (the reference's): one learned query attends over the thoughts; MSE x 5 to the embedding.

Front end: :class:`~trainer.heads.attention.ThoughtQueries` (1 query, 8 heads, width =
the embedding's). The loss is the mean squared error per sample, times 5. The
reference compares ``(B, 1, dim)`` with ``(B, dim)``, which broadcasts to every pair of
samples of a batch; with its batch of one that is the per-sample MSE we compute.
"""
from __future__ import annotations

import torch

from .attention import ThoughtQueries
from .base import AnchorHead, DimsSource

NUM_HEADS = 8
LOSS_SCALE = 5.0


class PooledEmbeddingHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        self.attend = ThoughtQueries(self.hidden_size, self.dims["dim"], num_queries=1, num_heads=NUM_HEADS)

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None, views=None) -> torch.Tensor:
        """Predicted embedding (B, dim)."""
        return self.attend(thoughts)[:, 0]

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        embedding = self.target(targets, "embedding", prediction.shape[0])
        return self.row_means((prediction.float() - embedding.float()).square()) * LOSS_SCALE
