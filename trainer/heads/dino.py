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
from torch import nn

from .base import AnchorHead, DimsSource, TokenProjection, attention_heads


class QueryCrossAttention(nn.Module):
    """``queries`` learnable (Q, dim) vectors attending over projected thought tokens -> (B, Q, out).

    Written with Linear layers + SDPA rather than nn.MultiheadAttention, whose forward
    reads ``out_proj``'s weights without calling ``out_proj``: ZeRO-3 gathers a
    module's parameters when that module's forward runs, so those would stay partitioned.
    """

    def __init__(self, hidden_size: int, num_queries: int, dim: int, out_features: int):
        super().__init__()
        self.heads = attention_heads(dim)
        self.project = TokenProjection(hidden_size, dim)
        self.key_norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.out_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, out_features)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, heads, N, dim/heads)
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, thoughts: torch.Tensor) -> torch.Tensor:
        keys = self.key_norm(self.project(thoughts))
        queries = self.queries.unsqueeze(0).expand(thoughts.shape[0], -1, -1)
        q = self._split(self.q(queries))
        k, v = self._split(self.k(keys)), self._split(self.v(keys))
        attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        attended = self.o(attended.transpose(1, 2).flatten(2))
        return self.output(self.out_norm(queries + attended))


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
