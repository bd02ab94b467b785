"""The mask decoder's image-to-token attention and the LayerNorm after it, in one Triton kernel.

In each of SAM's two-way blocks every image token attends to the prompt's 7 tokens, and the block's last step is
``norm4(keys + attention)``. Folded (:func:`precompute.anchors.sam_fast.image_to_tokens_folded`), a prompt's
attention is two thin products: the (4096, C) queries with a (C, 8 heads x 7) matrix made from the prompt's keys,
a softmax per head, and the (4096, 56) weights with a (56, C) matrix made from its values. Run as separate kernels,
each step writes a (4096, 56) or (4096, C) tensor per prompt and the next reads it back. :func:`image_to_tokens_norm`
makes the two matrices per prompt and then, per block of image tokens, computes the scores, the softmax, the output,
the residual and the LayerNorm on chip: a prompt's tokens are read once and the new ones written once.

It runs on CUDA devices, or anywhere under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported; for tests, in fp32: the interpreter's bf16 products are wrong).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from segment_anything.modeling.transformer import Attention as TwoWayAttention

from .triton_support import kernel_precision

TOKENS_PER_HEAD = 8  # the prompt's 7 tokens padded to a power of two (a padded column's score is -inf)


@triton.jit
def image_to_tokens_norm_kernel(q_ptr, q_index_ptr, pe_ptr, res_ptr, res_index_ptr, kmat_ptr, kbias_ptr, vmat_ptr,
                                obias_ptr, norm_w_ptr, norm_b_ptr, out_ptr, n_tokens, eps,
                                QW: tl.constexpr, C: tl.constexpr, HEADS: tl.constexpr, TP: tl.constexpr,
                                ADD_PE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (prompt, token block): ``norm(res + softmax_per_head((q [+ pe]) @ kmat + kbias) @ vmat + obias)`` for
    ``BLOCK`` image tokens of one prompt. ``q`` rows (``QW`` wide) and ``res`` rows (``C`` wide) are those of the
    tensors' entry ``q_index[prompt]`` / ``res_index[prompt]``: an image's shared tokens, or the prompt's own."""
    prompt = tl.program_id(0).to(tl.int64)  # prompt * n_tokens * C passes 2**31 from 2,048 prompts per call
    dtype = kmat_ptr.dtype.element_ty  # the products'
    HT: tl.constexpr = HEADS * TP
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = (t < n_tokens)[:, None]
    rq, rc, rh = tl.arange(0, QW), tl.arange(0, C), tl.arange(0, HT)
    q_row = tl.load(q_index_ptr + prompt).to(tl.int64)
    q = tl.load(q_ptr + q_row * n_tokens * QW + t[:, None] * QW + rq[None, :], mask=valid, other=0.0)
    if ADD_PE:
        q = q.to(tl.float32) + tl.load(pe_ptr + t[:, None] * QW + rq[None, :], mask=valid, other=0.0).to(tl.float32)
    kmat = tl.load(kmat_ptr + prompt * QW * HT + rq[:, None] * HT + rh[None, :])  # (QW, HT)
    scores = tl.dot(q.to(dtype), kmat, input_precision=PRECISION) + tl.load(kbias_ptr + prompt * HT + rh)[None, :]
    scores = tl.reshape(scores, (BLOCK, HEADS, TP))
    weights = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
    weights = tl.reshape(weights / tl.sum(weights, axis=2)[:, :, None], (BLOCK, HT))
    vmat = tl.load(vmat_ptr + prompt * HT * C + rh[:, None] * C + rc[None, :])  # (HT, C)
    out = tl.dot(weights.to(dtype), vmat, input_precision=PRECISION) + tl.load(obias_ptr + rc)[None, :]
    res_row = tl.load(res_index_ptr + prompt).to(tl.int64)
    x = out + tl.load(res_ptr + res_row * n_tokens * C + t[:, None] * C + rc[None, :], mask=valid,
                      other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = x - mean[:, None]
    var = tl.sum(centred * centred, axis=1) / C
    y = centred / tl.sqrt(var + eps)[:, None] * tl.load(norm_w_ptr + rc)[None, :] + tl.load(norm_b_ptr + rc)[None, :]
    tl.store(out_ptr + prompt * n_tokens * C + t[:, None] * C + rc[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid)


# Per shape on a GPU: the tokens per program and warps (the two (C, 64) matrices are 32 KB each in bf16).
ATTENTION_KERNEL_CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 8)]
tuned_image_to_tokens_norm_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ATTENTION_KERNEL_CONFIGS],
    key=["n_tokens", "QW", "C", "HEADS", "ADD_PE", "PRECISION"],
)(image_to_tokens_norm_kernel)


def products_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the decoder's products take ``x`` in: autocast's where it is on (bf16 in precompute), else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def padded_heads(x: torch.Tensor, heads: int, fill: float) -> torch.Tensor:
    """``(..., heads * T)`` columns as ``(..., heads * TOKENS_PER_HEAD)``, each head's T padded with ``fill``."""
    x = x.unflatten(-1, (heads, -1))
    return torch.nn.functional.pad(x, (0, TOKENS_PER_HEAD - x.shape[-1]), value=fill).flatten(-2)


def folded_matrices(attn: TwoWayAttention, k: torch.Tensor, v: torch.Tensor, q_projected: bool, dtype: torch.dtype):
    """The kernel's per-prompt ``kmat`` (n, QW, heads x 8), ``kbias`` (n, heads x 8) and ``vmat`` (n, heads x 8, C)
    from the prompt's projected keys and values ``k``, ``v`` (n, T, heads * d): the folded scores' and outputs'
    matrices of :func:`~precompute.anchors.sam_fast.image_to_tokens_folded`, each head's tokens padded to 8."""
    with torch.autocast(k.device.type, enabled=False):  # made in fp32, rounded once to the products' dtype
        return folded_matrices_fp32(attn, k.float(), v.float(), q_projected, dtype)


def folded_matrices_fp32(attn: TwoWayAttention, k: torch.Tensor, v: torch.Tensor, q_projected: bool,
                         dtype: torch.dtype):
    h = attn.num_heads
    kh = k.unflatten(-1, (h, -1)).transpose(1, 2)  # (n, H, T, d)
    vh = v.unflatten(-1, (h, -1)).transpose(1, 2)
    kh = kh / math.sqrt(kh.shape[-1])
    n, _, t, d = kh.shape
    if q_projected:  # the queries are q_proj's output: each head's channels meet only that head's keys
        kmat = torch.einsum("nhte,hg->nhegt", kh, torch.eye(h, device=k.device)).reshape(n, h * d, h * t)
        kbias = torch.zeros(n, h * t, device=k.device)
    else:
        w_q = attn.q_proj.weight.float().unflatten(0, (h, -1))  # (H, d, C)
        kmat = torch.einsum("hec,nhte->ncht", w_q, kh).flatten(2)
        kbias = torch.einsum("he,nhte->nht", attn.q_proj.bias.float().unflatten(0, (h, -1)), kh).flatten(1)
    w_o = attn.out_proj.weight.float().unflatten(1, (h, -1))  # (C, H, d)
    vmat = torch.einsum("nhte,che->nhtc", vh, w_o)  # (n, H, T, C)
    vmat = torch.nn.functional.pad(vmat, (0, 0, 0, TOKENS_PER_HEAD - t)).flatten(1, 2)
    kmat = padded_heads(kmat, h, 0.0)
    return kmat.to(dtype).contiguous(), padded_heads(kbias, h, float("-inf")).contiguous(), vmat.to(dtype).contiguous()


@torch.compiler.disable  # a graph break in the compiled decoding: inductor runs the kernel as it is
def image_to_tokens_norm(attn: TwoWayAttention, norm: torch.nn.LayerNorm, q: torch.Tensor, q_index: torch.Tensor,
                         res: torch.Tensor, res_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         pe: torch.Tensor | None = None, q_projected: bool = False,
                         out_dtype: torch.dtype | None = None, launch: dict | None = None) -> torch.Tensor:
    """``norm(res[res_index] + attn(q[q_index] (+ pe), k, v))`` for n prompts, ``(n, HW, C)`` in ``out_dtype`` (None:
    float32, as a LayerNorm under autocast gives).

    ``q`` (·, HW, QW) the image tokens that query (with ``q_projected``, already through ``attn.q_proj``); ``pe``
    (1, HW, QW) added to them; ``res`` (·, HW, C) the residual; ``q_index``, ``res_index`` (n,) each prompt's entry of
    ``q`` and ``res``; ``k``, ``v`` (n, T, heads * d) the prompt's tokens through ``attn.k_proj`` and ``attn.v_proj``.
    The products take autocast's dtype where it is on (as the library's would), the rest is float32. ``launch``: a
    fixed ``BLOCK`` and ``num_warps`` instead of the autotuner's (the interpreter: one program per prompt).
    """
    n, hw, c = k.shape[0], res.shape[1], res.shape[2]
    dtype = products_dtype(q)
    kmat, kbias, vmat = folded_matrices(attn, k, v, q_projected, dtype)
    out = torch.empty((n, hw, c), dtype=out_dtype or torch.float32, device=res.device)
    if n == 0:
        return out
    args = (q.contiguous(), q_index.contiguous(), (q if pe is None else pe).contiguous(), res.contiguous(),
            res_index.contiguous(), kmat, kbias, vmat, attn.out_proj.bias.float().contiguous(),
            norm.weight.float().contiguous(), norm.bias.float().contiguous(), out, hw, norm.eps)
    shape = {"QW": q.shape[-1], "C": c, "HEADS": attn.num_heads, "TP": TOKENS_PER_HEAD, "ADD_PE": pe is not None,
             "PRECISION": kernel_precision(dtype, res.is_cuda)}
    if res.is_cuda and launch is None:
        tuned_image_to_tokens_norm_kernel[lambda meta: (n, triton.cdiv(hw, meta["BLOCK"]))](*args, **shape)
    else:
        launch = launch or {"BLOCK": triton.next_power_of_2(hw)}
        image_to_tokens_norm_kernel[(n, triton.cdiv(hw, launch["BLOCK"]))](*args, **shape, **launch)
    return out

