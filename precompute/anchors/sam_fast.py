"""Faster attention for segment_anything's image encoder, computing the same function.

segment_anything's ``Attention.forward`` materialises the attention matrix with
explicit matmuls, adds the decomposed relative-position terms to it, then runs
softmax and another matmul: several full passes over a (B * heads, N, N) tensor,
which dominates the encoder on the 64 x 64 = 4096-token global blocks. Two
replacements built on ``F.scaled_dot_product_attention`` (fused kernels that
never write the attention matrix out) are installed per module instance, reusing
the module's own parameters, so state dict keys and checkpoints are unchanged:

- ``sdpa_bias``: the rel-pos terms ``rel_h[q, kh] + rel_w[q, kw]`` form an
  additive ``attn_mask`` in the query dtype (one (B, heads, N, N) tensor written
  once and read once by the memory-efficient / cuDNN kernel);
- ``sdpa_fold``: the same terms folded into the dot product, so no mask exists:
  ``q' = [q * scale, rel_h(q), rel_w(q)]`` and ``k' = [k, onehot(k_row), onehot(k_col)]``
  give ``q' . k' = scale q . k + rel_h[q, k_row] + rel_w[q, k_col]`` exactly; the
  kernel then does more multiply-adds (head dim 80 -> 208 on the global blocks)
  but reads no N x N mask.

``library`` restores segment_anything's forward. Which is fastest is a property
of the GPU and its kernels: bench/bench_precompute.py measures all three.
"""
from __future__ import annotations

import types

import torch
from torch.nn import functional as F

from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos

ATTENTION_MODES = ("library", "sdpa_bias", "sdpa_fold")
# the memory-efficient kernel wants the mask's row stride a multiple of 16 elements
# (it pads a copy otherwise); key head dims a multiple of 8 keep the fused kernels eligible
MASK_ROW_ALIGN = 16
HEAD_DIM_ALIGN = 8

_relative_index: dict[tuple[int, str], torch.Tensor] = {}
_key_onehots: dict[tuple[int, int, int, torch.dtype, str], torch.Tensor] = {}


def relative_index(size: int, device: torch.device) -> torch.Tensor:
    """``(size, size)`` index ``i - j + size - 1`` into a ``2 * size - 1`` row rel-pos table."""
    key = (size, str(device))
    if key not in _relative_index:
        ar = torch.arange(size, device=device)
        _relative_index[key] = ar[:, None] - ar[None, :] + (size - 1)
    return _relative_index[key]


def rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``get_rel_pos(size, size, rel_pos)``: (size, size, C) embeddings of the query-key offsets."""
    if rel_pos.shape[0] != 2 * size - 1:
        return get_rel_pos(size, size, rel_pos)  # the library's interpolation for other sizes
    return rel_pos[relative_index(size, rel_pos.device)]


def rel_pos_terms(attn: Attention, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed rel-pos logits of queries ``q`` (B, heads, h*w, C), from the unscaled query.

    Returns ``rel_h`` (B, heads, h, w, h) over key rows and ``rel_w`` (B, heads, h, w, w) over key columns.
    """
    rq = q.unflatten(2, (h, w))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rel_pos_table(attn.rel_pos_h, h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rel_pos_table(attn.rel_pos_w, w))
    return rel_h, rel_w


def split_qkv(attn: Attention, x: torch.Tensor):
    """q, k, v as (B, heads, H*W, C) strided views of one qkv projection of ``x`` (B, H, W, dim)."""
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).view(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def merge_heads(attn: Attention, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = out.shape[0]
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def sdpa_bias_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward with the rel-pos terms as an additive attn_mask."""
    b, h, w, _ = x.shape
    q, k, v = split_qkv(self, x)
    mask = None
    if self.use_rel_pos:
        rel_h, rel_w = rel_pos_terms(self, q, h, w)
        n = h * w
        if torch.is_grad_enabled():  # out= does not support autograd
            mask = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2).flatten(2, 3)
        else:
            # written straight into a row-aligned buffer: one pass, no padded copy inside SDPA
            buf = q.new_empty(b, self.num_heads, h, w, -(-n // MASK_ROW_ALIGN) * MASK_ROW_ALIGN)
            torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=buf[..., :n].unflatten(-1, (h, w)))
            mask = buf[..., :n].flatten(2, 3)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    return merge_heads(self, out, h, w)


def key_onehot(h: int, w: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h*w, width): key (i, j) has a 1 at column i and at column h + j, zeros after h + w."""
    key = (h, w, width, dtype, str(device))
    if key not in _key_onehots:
        t = torch.zeros(h, w, width, dtype=dtype, device=device)
        t[torch.arange(h, device=device), :, torch.arange(h, device=device)] = 1
        t[:, torch.arange(w, device=device), h + torch.arange(w, device=device)] = 1
        _key_onehots[key] = t.flatten(0, 1)
    return _key_onehots[key]


def sdpa_fold_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward with the rel-pos terms folded into widened queries and keys."""
    b, h, w, _ = x.shape
    q, k, v = split_qkv(self, x)
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return merge_heads(self, out, h, w)
    rel_h, rel_w = rel_pos_terms(self, q, h, w)
    c = q.shape[-1]
    width = -(-(c + h + w) // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN - c
    pad = width - h - w
    parts = [q * self.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)]
    if pad:
        parts.append(q.new_zeros(*q.shape[:-1], pad))
    q_wide = torch.cat([p.to(q.dtype) for p in parts], -1)
    onehot = key_onehot(h, w, width, k.dtype, k.device).expand(*k.shape[:-1], width)
    k_wide = torch.cat([k, onehot], -1)
    out = F.scaled_dot_product_attention(q_wide, k_wide, v, scale=1.0)
    return merge_heads(self, out, h, w)


FORWARDS = {"sdpa_bias": sdpa_bias_forward, "sdpa_fold": sdpa_fold_forward}


def use_encoder_attention(encoder: ImageEncoderViT, mode: str) -> None:
    """Run every Attention of ``encoder`` with ``mode`` (one of ``ATTENTION_MODES``); parameters untouched."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"SAM encoder attention {mode!r}: expected one of {ATTENTION_MODES}")
    for module in encoder.modules():
        if not isinstance(module, Attention):
            continue
        if mode == "library":
            module.__dict__.pop("forward", None)
        else:
            module.forward = types.MethodType(FORWARDS[mode], module)


def encoder_attention(encoder: ImageEncoderViT) -> str:
    """The mode installed on ``encoder``'s Attention modules."""
    fwd = next(m for m in encoder.modules() if isinstance(m, Attention)).__dict__.get("forward")
    if fwd is None:
        return "library"
    return next(name for name, f in FORWARDS.items() if fwd.__func__ is f)
