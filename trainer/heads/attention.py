"""The reference's query front end, shared by the sam, dino, pidinet, siglip and metaclip heads.

Every one of those heads in CoVT's reference (covt_qwen2_5_vl.py 969-995, e.g. 1548-1555)
does the same three steps on the thought tokens ``(B, k, hidden)``:

1. ``Linear(hidden, width)`` on each token;
2. ``F.normalize`` with its default ``dim=1``: on ``(B, k, width)`` that normalises each
   channel ACROSS the k thought tokens (not each token vector; this is the reference's
   maths and the default here);
3. learned query vectors ``(Q, width)`` attend to the normalised tokens with
   ``nn.MultiheadAttention(batch_first=True)``, key = value = the tokens.

Parameter names are part of the optimizer's contract: the reference gives a smaller
learning rate to every parameter whose name contains one of
:data:`PROJECTION_LR_NAME_PARTS`, so the three pieces are called ``thought_projection``,
``query_vectors`` and ``cross_attention`` (and the depth head's generator carries none of
those parts: it would train at the base rate, but the reference leaves it frozen at its init,
``train.trained_head_parameters``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: a parameter whose name contains one of these gets the reference's projection_layer_lr
#: (CoVT train/src/training/trainer.py: "_projection", "query_vectors", "cross_attention")
PROJECTION_LR_NAME_PARTS = ("_projection", "query_vectors", "cross_attention")


def uses_projection_lr(parameter_name: str) -> bool:
    """Whether the reference's optimizer puts ``parameter_name`` in its projection-lr groups."""
    return any(part in parameter_name for part in PROJECTION_LR_NAME_PARTS)


class MultiheadCrossAttention(nn.Module):
    """``nn.MultiheadAttention(dim, heads, batch_first=True)`` with key = value: same maths, names and init.

    Parameters are ``in_proj_weight`` ``(3 dim, dim)``, ``in_proj_bias``, ``out_proj`` (a
    Linear), exactly nn.MultiheadAttention's, so its state dicts load unchanged. Our own
    module rather than nn.MultiheadAttention because that one's forward reads
    ``out_proj``'s weights without calling ``out_proj``: ZeRO-3 gathers a module's
    parameters when that module's forward runs, so they would stay partitioned.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention._reset_parameters: xavier in-projection, zero biases
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, heads, N, dim/heads)
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``queries`` (B, Q, dim) attend over ``tokens`` (B, k, dim) -> (B, Q, dim)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split(F.linear(queries, w_q, b_q))
        k = self._split(F.linear(tokens, w_k, b_k))
        v = self._split(F.linear(tokens, w_v, b_v))
        attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # (B, heads, Q, dim/heads)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class ThoughtQueries(nn.Module):
    """thoughts ``(B, k, hidden)`` -> ``(B, num_queries, width)``: project, normalise across tokens, attend.

    Initialised as the reference: default Linear, ``torch.randn`` queries (unit scale),
    nn.MultiheadAttention's init.
    """

    def __init__(self, hidden_size: int, width: int, num_queries: int, num_heads: int):
        super().__init__()
        self.thought_projection = nn.Linear(hidden_size, width)
        self.query_vectors = nn.Parameter(torch.randn(num_queries, width))
        self.cross_attention = MultiheadCrossAttention(width, num_heads)

    def forward(self, thoughts: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(self.thought_projection(thoughts), dim=1)  # dim=1: across the k tokens (reference)
        queries = self.query_vectors.unsqueeze(0).expand(thoughts.shape[0], -1, -1).to(tokens.dtype)
        return self.cross_attention(queries, tokens)
