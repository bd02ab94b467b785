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

import math
import types

import torch
from segment_anything.modeling import MaskDecoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    add_decomposed_rel_pos,
    get_rel_pos,
    window_partition,
    window_unpartition,
)
from segment_anything.modeling.transformer import Attention as TwoWayAttention
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch.nn import functional as F

ATTENTION_MODES = ("library", "sdpa_bias", "sdpa_fold")
# the memory-efficient kernel wants the mask's row stride a multiple of 16 elements
# (it pads a copy otherwise); key head dims a multiple of 8 keep the fused kernels eligible
MASK_ROW_ALIGN = 16
HEAD_DIM_ALIGN = 8

_relative_index: dict[tuple[int, str], torch.Tensor] = {}
_key_onehots: dict[tuple[int, int, int, torch.dtype, str], torch.Tensor] = {}


def per_shape(cache: dict, key: tuple, make) -> torch.Tensor:
    """``make()``, kept in ``cache`` under ``key`` for eager calls. A compiled graph makes its own (a few small
    kernels): reading the cache there would guard on its contents, which the first call fills, so the whole encoder
    would compile a second time on the next batch."""
    if torch.compiler.is_compiling():
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def relative_index(size: int, device: torch.device) -> torch.Tensor:
    """``(size, size)`` index ``i - j + size - 1`` into a ``2 * size - 1`` row rel-pos table."""
    def make() -> torch.Tensor:
        ar = torch.arange(size, device=device)
        return ar[:, None] - ar[None, :] + (size - 1)

    return per_shape(_relative_index, (size, str(device)), make)


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


def qkv_heads(attn: Attention, qkv: torch.Tensor):
    """q, k, v as (B, heads, H*W, C) strided views of a qkv projection (B, H, W, 3 * dim)."""
    b, h, w, _ = qkv.shape
    return qkv.view(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def split_qkv(attn: Attention, x: torch.Tensor):
    """q, k, v as (B, heads, H*W, C) strided views of one qkv projection of ``x`` (B, H, W, dim)."""
    return qkv_heads(attn, attn.qkv(x))


def heads_merged(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, heads, h*w, C) -> (B, h, w, heads * C), before the output projection."""
    return out.transpose(1, 2).reshape(out.shape[0], h, w, -1)


def merge_heads(attn: Attention, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return attn.proj(heads_merged(out, h, w))


def library_core(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """segment_anything's attention maths (explicit scores, decomposed rel-pos added, softmax) on split heads."""
    b, heads, n, c = q.shape
    q, k, v = (t.reshape(b * heads, n, c) for t in (q, k, v))
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if self.use_rel_pos:
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
    return (attn.softmax(dim=-1) @ v).view(b, heads, n, c)


def sdpa_bias_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward with the rel-pos terms as an additive attn_mask."""
    h, w = x.shape[1], x.shape[2]
    return merge_heads(self, sdpa_bias_core(self, *split_qkv(self, x), h, w), h, w)


def sdpa_bias_core(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The attention of :func:`sdpa_bias_forward` on split heads, before the output projection."""
    b = q.shape[0]
    mask = None
    if self.use_rel_pos:
        rel_h, rel_w = rel_pos_terms(self, q, h, w)
        n = h * w
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # out= supports neither autograd nor inductor
            mask = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2).flatten(2, 3)
        else:
            # written straight into a row-aligned buffer: one pass, no padded copy inside SDPA
            buf = q.new_empty(b, self.num_heads, h, w, -(-n // MASK_ROW_ALIGN) * MASK_ROW_ALIGN)
            torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=buf[..., :n].unflatten(-1, (h, w)))
            mask = buf[..., :n].flatten(2, 3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


def key_onehot(h: int, w: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h*w, width): key (i, j) has a 1 at column i and at column h + j, zeros after h + w."""
    def make() -> torch.Tensor:
        column = torch.arange(width, device=device)
        row = torch.arange(h, device=device)[:, None, None]
        col = torch.arange(w, device=device)[None, :, None]
        return ((column == row) | (column == h + col)).to(dtype).flatten(0, 1)

    return per_shape(_key_onehots, (h, w, width, dtype, str(device)), make)


def sdpa_fold_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward with the rel-pos terms folded into widened queries and keys."""
    h, w = x.shape[1], x.shape[2]
    return merge_heads(self, sdpa_fold_core(self, *split_qkv(self, x), h, w), h, w)


def sdpa_fold_core(self: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The attention of :func:`sdpa_fold_forward` on split heads, before the output projection."""
    if not self.use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
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
    return F.scaled_dot_product_attention(q_wide, k_wide, v, scale=1.0)


FORWARDS = {"sdpa_bias": sdpa_bias_forward, "sdpa_fold": sdpa_fold_forward}
CORES = {"library": library_core, "sdpa_bias": sdpa_bias_core, "sdpa_fold": sdpa_fold_core}


def use_encoder_attention(encoder: ImageEncoderViT, mode: str) -> None:
    """Run every Attention of ``encoder`` with ``mode`` (one of ``ATTENTION_MODES``); parameters untouched."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"SAM encoder attention {mode!r}: expected one of {ATTENTION_MODES}")
    for module in encoder.modules():
        if not isinstance(module, Attention):
            continue
        module.attention_mode = mode  # read by attention_mode(): the unpadded window blocks (below) use it too
        if mode == "library":
            module.__dict__.pop("forward", None)
        else:
            module.forward = types.MethodType(FORWARDS[mode], module)


def attention_mode(attn: Attention) -> str:
    """The mode :func:`use_encoder_attention` installed on ``attn`` (``library`` where it never ran)."""
    return getattr(attn, "attention_mode", "library")


def encoder_attention(encoder: ImageEncoderViT) -> str:
    """The mode installed on ``encoder``'s Attention modules."""
    return attention_mode(next(m for m in encoder.modules() if isinstance(m, Attention)))


# ------------------------------------------------------------------ encoder windows without padded tokens
def padded_projection(linear: torch.nn.Linear, x: torch.Tensor, window: int) -> torch.Tensor:
    """``linear`` of ``window_partition``'s zero-padded tokens, made without projecting the padding: ``x``
    (B, H, W, dim) is projected, then padded at the bottom and right to multiples of ``window`` with what a zero token
    projects to, the bias (in the projection's dtype, as autocast's Linear adds it)."""
    y = linear(x)
    b, h, w, c = y.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if not (pad_h or pad_w):
        return y
    fill = y.new_zeros(c) if linear.bias is None else linear.bias.to(y.dtype)
    out = fill.expand(b, h + pad_h, w + pad_w, c).clone()
    out[:, :h, :w] = y
    return out


def unpadded_window_block_forward(self: Block, x: torch.Tensor) -> torch.Tensor:
    """``Block.forward`` computing the same function with the windowed blocks' qkv and output projections on the
    image's tokens only. segment_anything pads the normed tokens to whole windows (ViT-H: 64x64 -> 70x70, 20% more
    tokens) before both projections; the padded keys and values (the qkv bias) still take part in attention, so the
    projection is padded with that bias instead, and the padded outputs, which the block drops, are never projected.
    For blocks with ``window_size > 0`` (:func:`use_unpadded_windows` installs it on those only)."""
    attn, size = self.attn, self.window_size
    shortcut = x
    x = self.norm1(x)
    h, w = x.shape[1], x.shape[2]
    windows, pad_hw = window_partition(padded_projection(attn.qkv, x, size), size)
    out = CORES[attention_mode(attn)](attn, *qkv_heads(attn, windows), size, size)
    x = shortcut + attn.proj(window_unpartition(heads_merged(out, size, size), size, pad_hw, (h, w)))
    return x + self.mlp(self.norm2(x))


def use_unpadded_windows(encoder: ImageEncoderViT, on: bool) -> None:
    """Run every windowed Block of ``encoder`` through :func:`unpadded_window_block_forward` (``on``) or the
    library's ``Block.forward``; parameters untouched."""
    for module in encoder.modules():
        if isinstance(module, Block) and module.window_size > 0:
            if on:
                module.forward = types.MethodType(unpadded_window_block_forward, module)
            else:
                module.__dict__.pop("forward", None)


def unpadded_windows(encoder: ImageEncoderViT) -> bool:
    """Whether ``encoder``'s windowed blocks run :func:`unpadded_window_block_forward`."""
    return any("forward" in m.__dict__ for m in encoder.modules() if isinstance(m, Block))


# ------------------------------------------------------------------ mask decoder output
def transposed_conv_as_linear(conv: torch.nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (4 * out, in) and bias of a kernel-2 stride-2 ConvTranspose2d as a per-pixel Linear.

    Output rows are ordered (di, dj, out): input pixel (y, x) writes output pixel (2y + di, 2x + dj).
    """
    if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError(f"expected SAM's kernel-2 stride-2 ConvTranspose2d, got {conv}")
    c_in, c_out = conv.weight.shape[:2]
    return conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in), conv.bias.repeat(4)


def hypernetwork_outputs(md: MaskDecoder, mask_tokens: torch.Tensor, first_token: int = 0) -> torch.Tensor:
    """``(n, T, C2)``: the outputs ``(n, T, C)`` of mask tokens ``first_token``, ``first_token + 1``, ... through
    each one's hypernetwork MLP, the weights their masks contract the upscaled image tokens with."""
    return torch.stack([md.output_hypernetworks_mlps[first_token + i](mask_tokens[:, i])
                        for i in range(mask_tokens.shape[1])], 1)


def mask_logits(md: MaskDecoder, src: torch.Tensor, h: int, w: int, mask_tokens: torch.Tensor,
                first_token: int = 0) -> torch.Tensor:
    """``MaskDecoder``'s mask logits ``(n, T, 4h, 4w)`` from transformer outputs, channels last.

    ``src`` (n, h*w, C) are the image tokens and ``mask_tokens`` (n, T, C) the outputs of the mask tokens
    ``first_token``, ``first_token + 1``, ... (each has its hypernetwork). The library transposes the tokens
    to NCHW, upscales with two ConvTranspose2d (LayerNorm2d between them as separate element-wise ops), then contracts
    the 32-channel map with each hypernetwork's output. Here each transposed convolution
    is a per-pixel Linear on the token-major layout, the norm is one fused layer_norm over
    the channel (last) dim, only the tokens given are contracted, and the sub-pixel
    order is unshuffled on the small contracted logits instead of the 32-channel map.
    """
    conv1, norm, act1, conv2, act2 = md.output_upscaling
    w1, b1 = transposed_conv_as_linear(conv1)
    w2, b2 = transposed_conv_as_linear(conv2)
    c1, c2 = conv1.out_channels, conv2.out_channels
    x = F.linear(src, w1, b1).unflatten(-1, (4, c1))  # (n, hw, di*dj, c1)
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = act2(F.linear(x, w2, b2))  # (n, hw, di*dj, ei*ej*c2)
    n, m = mask_tokens.shape[:2]
    hyper = hypernetwork_outputs(md, mask_tokens, first_token)
    x = x.reshape(n, h * w * 16, c2)
    if torch.compiler.is_compiling():  # a reduction inductor fuses with the GELU above: x is read once, not written
        logits = (x[:, :, None] * hyper[:, None].to(x.dtype)).sum(-1)
    else:
        logits = x @ hyper.transpose(1, 2).to(x.dtype)  # (n, hw*16, m); n may be 0
    # (n, y, x, di, dj, ei, ej, m) -> (n, m, y, di, ei, x, dj, ej): pixel (4y + 2di + ei, 4x + 2dj + ej)
    logits = logits.view(n, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return logits.reshape(n, m, 4 * h, 4 * w)


# ------------------------------------------------------------------ mask decoder transformer
# How the mask decoder's attention is computed (precompute.sam.decoder_attention): segment_anything's maths, one
# fused SDPA call, or "folded": in the attentions between a prompt's few tokens and the 4,096 image tokens, the
# projections of the image side are moved onto the tokens' side (associativity), so no projection of the image
# tokens is made per prompt.
DECODER_ATTENTIONS = ("library", "sdpa", "folded")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def attend(attn: TwoWayAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: str) -> torch.Tensor:
    """segment_anything's transformer ``Attention.forward`` on already projected q, k, v: its maths (explicit
    products and softmax), or one ``scaled_dot_product_attention`` call (``how="sdpa"``)."""
    h = attn.num_heads
    q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
    if how == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return attn.out_proj(out.transpose(-3, -2).flatten(-2))


def head_rows(linear: torch.nn.Linear, num_heads: int) -> torch.Tensor:
    """A projection's weight ``(heads * d, C)`` as ``(heads, d, C)``: the rows each head's channels come from."""
    return linear.weight.unflatten(0, (num_heads, -1))


def tokens_to_image_folded(attn: TwoWayAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q, k, v)`` for a prompt's tokens ``q`` (n, T, C) over image tokens ``k``, ``v`` (n, HW, C).

    Each head's scores ``q_h . (W_k,h k_j + b_k,h)`` are ``(W_k,h^T q_h) . k_j`` plus a term that is the same for
    every key j (the softmax drops it); its output ``sum_j p_j (W_v,h v_j + b_v,h)`` is ``W_v,h (sum_j p_j v_j) +
    b_v,h``. So the image side is never projected: T * heads rows meet the HW keys at width C instead.
    """
    h = attn.num_heads
    qh = split_heads(attn.q_proj(q), h)  # (n, H, T, d)
    qh = qh / math.sqrt(qh.shape[-1])
    q_wide = torch.einsum("nhte,hec->nhtc", qh, head_rows(attn.k_proj, h)).flatten(1, 2)  # (n, H*T, C)
    context = torch.softmax(q_wide @ k.transpose(-2, -1), dim=-1) @ v  # (n, H*T, C)
    out = torch.einsum("nhtc,hec->nthe", context.unflatten(1, (h, -1)), head_rows(attn.v_proj, h))
    out = out + attn.v_proj.bias.unflatten(0, (h, -1))
    return attn.out_proj(out.flatten(-2))


def image_to_tokens_folded(attn: TwoWayAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_projected: bool = False) -> torch.Tensor:
    """``attn(q, k, v)`` for image tokens ``q`` (n or 1, HW, C) over a prompt's tokens, ``k`` and ``v`` (n, T, heads
    * d) already projected; ``q_projected``: ``q`` is ``attn.q_proj`` of the image tokens already (n or 1, HW,
    heads * d).

    The scores of all heads come from one product of ``q`` with a (C, heads * T) matrix made from the keys (each
    head's ``W_q,h^T k_h``, plus the query bias's term; a block-diagonal of the keys when ``q`` is projected), and
    the output projection acts on the T values of each head before they are mixed: ``W_o (sum_t p_t v_t) =
    sum_t p_t (W_o,h v_t)``. So nothing of width heads * d is made per image token.
    """
    h = attn.num_heads
    kh, vh = split_heads(k, h), split_heads(v, h)  # (n, H, T, d)
    kh = kh / math.sqrt(kh.shape[-1])
    n, _, t, d = kh.shape
    if q_projected:
        eye = torch.eye(h, dtype=kh.dtype, device=kh.device)
        keys = torch.einsum("nhte,hg->nhegt", kh, eye).reshape(n, h * d, h * t)
        scores = q @ keys
    else:
        keys = torch.einsum("hec,nhte->ncht", head_rows(attn.q_proj, h), kh).flatten(2)  # (n, C, H*T)
        bias = torch.einsum("he,nhte->nht", attn.q_proj.bias.unflatten(0, (h, -1)), kh).flatten(1)
        scores = q @ keys + bias[:, None]
    p = torch.softmax(scores.unflatten(-1, (h, t)), dim=-1).flatten(-2)  # (n, HW, H*T)
    values = torch.einsum("nhte,che->nhtc", vh, attn.out_proj.weight.unflatten(1, (h, -1))).flatten(1, 2)
    return p @ values + attn.out_proj.bias


def attention(attn: TwoWayAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: str) -> torch.Tensor:
    """segment_anything's transformer ``Attention.forward(q, k, v)`` (``how``: one of :data:`DECODER_ATTENTIONS`;
    "folded" applies to the attentions between tokens and image, the others are computed as "library")."""
    if how == "folded" and q.shape[-2] < k.shape[-2]:
        return tokens_to_image_folded(attn, q, k, v)
    if how == "folded" and q.shape[-2] > k.shape[-2]:
        return image_to_tokens_folded(attn, q, attn.k_proj(k), attn.v_proj(v))
    return attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v), how)


def stored(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` kept in ``dtype`` (None: as it is)."""
    return x if dtype is None else x.to(dtype)


def decoder_transformer(t: TwoWayTransformer, image_tokens: torch.Tensor, image_pe: torch.Tensor,
                        groups: list[tuple[int, int]], tokens: torch.Tensor, how: str = "library",
                        tokens_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` for prompts of several images, image-side work of layer 0 shared.

    ``image_tokens`` (U, HW, C) are the images' tokens (dense prompt embedding added),
    ``image_pe`` (1, HW, C) their positional encoding, ``tokens`` (n, T, C) the prompts'
    output + sparse tokens, ordered by image: ``groups`` lists (image index, prompt count)
    in that order. Until the first image-to-token attention every prompt of an image sees
    the same image tokens, so their projections are computed once per image and the
    token-to-image attention runs all of that image's prompts as one query set. Later
    layers and the final attention are the library's modules on per-prompt tokens.
    Returns (queries (n, T, C), keys (n, HW, C)) as the library does. ``how``: see :func:`attention`.
    ``tokens_dtype``: each prompt's image tokens (and their positional encoding) are kept in that dtype between the
    layers; under bf16 autocast the LayerNorms that make them give float32, which every later product reads.
    """
    first = t.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("decoder_transformer expects SAM's first two-way block (skip_first_layer_pe)")
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    n_tok = tokens.shape[1]
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    q_t2i = t2i.q_proj(queries + tokens)
    shared, attn_out, start = [], [], 0
    for image, count in groups:
        keys = image_tokens[image]
        keys_pe = keys + image_pe[0]
        shared.append((keys, i2t.q_proj(keys_pe)))
        q = q_t2i[start:start + count].flatten(0, 1)  # every prompt's tokens query the same image
        attn_out.append(attend(t2i, q[None], t2i.k_proj(keys_pe)[None], t2i.v_proj(keys)[None], how)[0])
        start += count
    queries = first.norm2(queries + torch.cat(attn_out).unflatten(0, (-1, n_tok)))
    queries = first.norm3(queries + first.mlp(queries))
    k_i2t, v_i2t = i2t.k_proj(queries + tokens), i2t.v_proj(queries)
    new_keys, start = [], 0
    for (_, count), (keys, q_image) in zip(groups, shared, strict=True):
        sel = slice(start, start + count)
        if how == "folded":
            out = image_to_tokens_folded(i2t, q_image[None], k_i2t[sel], v_i2t[sel], q_projected=True)
        else:
            out = attend(i2t, q_image.expand(count, -1, -1), k_i2t[sel], v_i2t[sel], how)
        new_keys.append(stored(first.norm4(keys + out), tokens_dtype))
        start += count
    keys = new_keys[0] if len(new_keys) == 1 else torch.cat(new_keys)  # one image per call: no copy
    image_pe = stored(image_pe, tokens_dtype)
    for layer in t.layers[1:]:
        queries, keys = two_way_block(layer, queries, keys, tokens, image_pe, how, tokens_dtype)
    attn_out = attention(t.final_attn_token_to_image, queries + tokens, keys + image_pe, keys, how)
    return t.norm_final_attn(queries + attn_out), keys


def two_way_block(layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  key_pe: torch.Tensor, how: str, keys_dtype: torch.dtype | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """``TwoWayAttentionBlock.forward`` (a block after the first); ``how``: see :func:`attention`; ``keys_dtype``: the
    dtype of the image tokens it returns (None: the LayerNorm's)."""
    q = queries + query_pe
    queries = layer.norm1(queries + attention(layer.self_attn, q, q, queries, how))
    keys_pe = keys + key_pe  # the library adds it twice; keys do not change in between
    queries = layer.norm2(queries + attention(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys,
                                              how))
    queries = layer.norm3(queries + layer.mlp(queries))
    out = attention(layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries, how)
    return queries, stored(layer.norm4(keys + out), keys_dtype)


def decode_outputs(sam: Sam, emb: torch.Tensor, img: torch.Tensor, sparse: torch.Tensor, how: str = "library",
                   keys_dtype: torch.dtype | None = None, tokens_dtype: torch.dtype | None = None):
    """The mask decoder's transformer for single prompts, no dense prompt, for prompts of many images in one call.

    Returns the multimask tokens ``(n, M, C)``, the image keys ``(n, h*w, C)`` (what :func:`multimask_logits`
    turns into masks) and the predicted IoUs ``(n, M)``, those of ``MaskDecoder.forward(emb[img[j]], ...,
    sparse[j], no_mask_embed, multimask_output=True)`` for each prompt j; consecutive prompts of one image
    share that image's layer-0 work (any order is correct). ``how``: the attention's computation (:func:`attention`).
    ``keys_dtype``: the keys in that dtype (compiled, the cast is fused into the LayerNorm that makes them).
    ``tokens_dtype``: the prompts' image tokens kept in that dtype between the transformer's layers too
    (:func:`decoder_transformer`).
    """
    md, pe = sam.mask_decoder, sam.prompt_encoder
    n = sparse.shape[0]
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], 1)
    images, counts = torch.unique_consecutive(img, return_counts=True)
    used = emb[images] + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
    image_tokens = used.flatten(2).transpose(1, 2)
    image_pe = pe.get_dense_pe().flatten(2).transpose(1, 2)
    groups = list(enumerate(counts.tolist()))
    hs, keys = decoder_transformer(md.transformer, image_tokens, image_pe, groups, tokens, how, tokens_dtype)
    iou = md.iou_prediction_head(hs[:, 0])[:, 1:]  # token 0 is the single-mask output
    return hs[:, 2:1 + md.num_mask_tokens], stored(keys, keys_dtype), iou


def multimask_logits(sam: Sam, keys: torch.Tensor, mask_tokens: torch.Tensor) -> torch.Tensor:
    """Mask logits ``(n, M, 4h, 4w)`` of :func:`decode_outputs`' keys and multimask tokens (any subset of rows)."""
    md = sam.mask_decoder
    h, w = sam.prompt_encoder.image_embedding_size
    return mask_logits(md, keys, h, w, mask_tokens, first_token=1)
