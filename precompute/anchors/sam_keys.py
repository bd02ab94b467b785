"""The mask decoder's per-prompt image tokens made on chip: its attentions to the image after the first layer in Triton.

In SAM's two-way transformer every prompt changes the image's 4,096 tokens (the "keys") once per layer:
``keys_l = LayerNorm(keys_(l-1) + attention of each key over the prompt's 7 tokens)``. The next stage's token-to-image
attention reads them back (7 queries over the 4,096 keys), and the masks are made from the last layer's. At 32
points per side an image has 1,024 prompts: written out per prompt and read back several times per layer, these
(4096, 256) tensors make the decoder wait on memory, not on its products.

Each update is small per prompt once its projections are moved onto the prompt's side
(:func:`sam_fast.image_to_tokens_matrices`): the scores of all heads are one product of ``keys + pe`` with a (C, R)
matrix, the softmax runs over each head's 7 columns, and the output is one product of the probabilities with an
(R, C) matrix (R = heads x 8 columns, each head's 7 tokens padded to 8). :func:`prompt_keys_attention` runs a
program per prompt (and block of tokens) that walks the image's own tokens, shared by its prompts, applies the
updates of the layers so far on chip, and reduces the next token-to-image attention as flash attention does (a
running maximum and sum of the scores), so a prompt's keys are written only once, from the last layer, for its
masks. The sums follow the library's: products in the operands' dtype (bf16 under the decoder's autocast, else
TF32 as :func:`sam_triton.product_precision` says), LayerNorm and softmax in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sam_triton import product_precision
from .sam_triton import runs_on as kernels_run_on


@triton.jit
def prompt_keys_kernel(image_ptr, pe_ptr, which_ptr, proj_ptr, proj_bias_ptr, values_ptr, out_bias_ptr, norm_w_ptr,
                       norm_b_ptr, queries_ptr, acc_ptr, stats_ptr, keys_ptr, n_tokens, span, eps,
                       C: tl.constexpr, R: tl.constexpr, T: tl.constexpr, COLS: tl.constexpr, LAYERS: tl.constexpr,
                       STORE_KEYS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Program (prompt, split): tokens ``split * span`` to ``(split + 1) * span`` of the prompt's image.

    Writes the unnormalised attention output ``acc`` (R, C) of ``queries`` over those keys, with the running
    maximum and sum of its scores (``stats``: 2, R), and with ``STORE_KEYS`` the keys after ``LAYERS`` updates."""
    prompt, split = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(1)
    image = tl.load(which_ptr + prompt).to(tl.int64)
    rc, rr = tl.arange(0, C), tl.arange(0, R)
    queries = tl.load(queries_ptr + prompt * R * C + rr[:, None] * C + rc[None, :])  # (R, C)
    dtype = queries.dtype
    real = (rr % COLS) < T  # column head * COLS + t holds token t
    m_i = tl.full((R,), float("-inf"), tl.float32)
    l_i = tl.zeros((R,), tl.float32)
    acc = tl.zeros((R, C), tl.float32)
    end = tl.minimum((split + 1) * span, n_tokens)
    for start in range(split * span, end, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = t < end
        offsets = t[:, None] * C + rc[None, :]
        keys = tl.load(image_ptr + image * n_tokens * C + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        pe = tl.load(pe_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        for layer in tl.static_range(LAYERS):  # keys <- LayerNorm(keys + attention over the prompt's tokens)
            at = (prompt * LAYERS + layer).to(tl.int64)
            proj = tl.load(proj_ptr + at * C * R + rc[:, None] * R + rr[None, :])  # (C, R)
            s = tl.dot((keys + pe).to(dtype), proj, input_precision=PRECISION)
            s = tl.where(real[None, :], s + tl.load(proj_bias_ptr + at * R + rr)[None, :], float("-inf"))
            s = tl.reshape(s, (BLOCK, R // COLS, COLS))  # per head
            e = tl.exp(s - tl.max(s, axis=2)[:, :, None])
            p = tl.reshape(e / tl.sum(e, axis=2)[:, :, None], (BLOCK, R))
            values = tl.load(values_ptr + at * R * C + rr[:, None] * C + rc[None, :])  # (R, C)
            x = keys + tl.dot(p.to(dtype), values, input_precision=PRECISION)
            x += tl.load(out_bias_ptr + layer * C + rc)[None, :]
            mean = tl.sum(x, axis=1) / C
            centred = x - mean[:, None]
            var = tl.sum(centred * centred, axis=1) / C
            keys = centred / tl.sqrt(var + eps)[:, None] * tl.load(norm_w_ptr + layer * C + rc)[None, :] \
                + tl.load(norm_b_ptr + layer * C + rc)[None, :]
        if STORE_KEYS:
            out = keys_ptr + prompt.to(tl.int64) * n_tokens * C + offsets
            tl.store(out, keys.to(keys_ptr.dtype.element_ty), mask=valid[:, None])
        s = tl.dot(queries, tl.trans((keys + pe).to(dtype)), input_precision=PRECISION)  # (R, BLOCK)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        acc = acc * alpha[:, None] + tl.dot(e.to(dtype), keys.to(dtype), input_precision=PRECISION)
        m_i = m_new
    at = prompt.to(tl.int64) * splits + split
    tl.store(acc_ptr + at * R * C + rr[:, None] * C + rc[None, :], acc)
    tl.store(stats_ptr + at * 2 * R + rr, m_i)
    tl.store(stats_ptr + at * 2 * R + R + rr, l_i)


# On a GPU the tokens per block and the warps are tuned once per shape (configs whose shared memory does not fit
# are skipped); the splits of a prompt's tokens are chosen so that a call has several programs per multiprocessor.
# One stage: the compiler keeps the loop-invariant matrices (the queries, each layer's two) in shared memory, and
# pipelining the token loads on top would not fit.
tuned_prompt_keys_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": block}, num_warps=warps, num_stages=1)
             for block in (16, 32, 64) for warps in (4, 8)],
    key=["n_tokens", "span", "C", "R", "COLS", "LAYERS", "STORE_KEYS", "PRECISION"],
)(prompt_keys_kernel)


def runs_on(device: torch.device) -> bool:
    """Whether :func:`prompt_keys_attention` runs for the decoder's products on ``device`` as set now: on CUDA
    (in bf16 under autocast or in TF32; fp32 products as three TF32 ones need more shared memory than a
    multiprocessor has) or under Triton's interpreter."""
    if device.type == "cuda" and not torch.is_autocast_enabled("cuda"):
        return torch.backends.cuda.matmul.allow_tf32
    return kernels_run_on(device)


def token_columns(tokens: int) -> int:
    """Each head's columns for ``tokens`` prompt tokens: a power of two (8 for a single point's 7 tokens)."""
    return triton.next_power_of_2(tokens)


def token_splits(n_prompts: int, n_tokens: int, device: torch.device) -> int:
    """How many programs share a prompt's tokens: about 8 programs per multiprocessor in a call, at least 256 tokens
    each (one on the CPU)."""
    if device.type != "cuda" or n_prompts == 0:
        return 1
    programs = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-programs // n_prompts), n_tokens // 256))


@torch.compiler.disable  # a kernel launch with autotuning: outside any compiled graph
def prompt_keys_attention(image_tokens: torch.Tensor, pe: torch.Tensor, which: torch.Tensor,
                          updates: list[tuple[torch.Tensor, ...]], queries: torch.Tensor, tokens: int, eps: float,
                          keys_dtype: torch.dtype | None = None,
                          splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each prompt's token-to-image attention over its keys after the layers' ``updates``, and those keys.

    ``image_tokens`` (U, N, C) the images' tokens, ``pe`` (N, C) their positional encoding, ``which`` (n,) each
    prompt's image, ``tokens`` the prompts' token count T; the R columns of the matrices below are ``heads x
    token_columns(T)``, head-major, each head's columns past T zero. ``updates``: per layer so far ``(proj (n, C,
    R), proj_bias (n, R), values (n, R, C), out_bias (C,), norm_weight (C,), norm_bias (C,))``: keys <-
    LayerNorm(keys + softmax over each head's columns of ((keys + pe) proj + proj_bias) values + out_bias).
    ``queries`` (n, R, C): the attention's queries with the keys' projection moved onto them (scores = queries .
    (keys + pe)). Returns the attention's output (n, R, C) over the keys (fp32) and, with ``keys_dtype``, the keys
    (n, N, C) in that dtype (else None). Products in ``queries``' dtype. ``splits``: programs per prompt, each over
    a span of its tokens (default :func:`token_splits`).
    """
    n, r, c = queries.shape
    n_tokens = image_tokens.shape[1]
    dtype = queries.dtype
    proj, proj_bias, values = (torch.stack([u[i] for u in updates], 1) for i in range(3))
    out_bias, norm_w, norm_b = (torch.stack([u[i] for u in updates]).float().contiguous() for i in range(3, 6))
    splits = splits or token_splits(n, n_tokens, queries.device)
    span = -(-n_tokens // splits)
    if queries.is_cuda:
        span = -(-span // 64) * 64  # whole blocks of every tuned size
        splits = -(-n_tokens // span)
    acc = torch.empty((n, splits, r, c), dtype=torch.float32, device=queries.device)
    stats = torch.empty((n, splits, 2, r), dtype=torch.float32, device=queries.device)
    stored = (n, n_tokens, c) if keys_dtype is not None else (1,)
    keys = torch.empty(stored, dtype=keys_dtype or dtype, device=queries.device)
    if n:
        args = (image_tokens.float().contiguous(), pe.float().contiguous(), which.to(torch.int32).contiguous(),
                proj.to(dtype).contiguous(), proj_bias.float().contiguous(), values.to(dtype).contiguous(),
                out_bias, norm_w, norm_b, queries.contiguous(), acc, stats, keys, n_tokens, span, eps)
        shape = {"C": c, "R": r, "T": tokens, "COLS": token_columns(tokens), "LAYERS": len(updates),
                 "STORE_KEYS": keys_dtype is not None, "PRECISION": product_precision(queries)}
        if queries.is_cuda:
            tuned_prompt_keys_kernel[(n, splits)](*args, **shape)
        else:  # the interpreter's cost is per operation, not per element: one block of all tokens
            prompt_keys_kernel[(n, splits)](*args, **shape, BLOCK=triton.next_power_of_2(span))
    # the splits' partial sums, rescaled to one maximum
    top = stats[:, :, 0].amax(1, keepdim=True)
    scale = torch.exp(stats[:, :, 0] - top)  # (n, splits, R)
    total = (stats[:, :, 1] * scale).sum(1)
    out = (acc * scale[..., None]).sum(1) / total[..., None]
    return out, keys if keys_dtype is not None else None
