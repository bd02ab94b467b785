"""SAM's multimask upscaling and the automatic mask generator's per-mask statistics in one Triton kernel.

For every prompt the mask decoder turns its (h*w, C) image tokens into three (4h, 4w) mask logits: two
kernel-2 stride-2 transposed convolutions (a LayerNorm and a GELU between them, a GELU after), then a contraction
with each mask token's hypernetwork output (:func:`precompute.anchors.sam_fast.mask_logits`). The automatic mask
generator then reads the logits back for three things only: the mask (logit > 0), and the pixel counts above +1
and above -1 (the stability score). At 32 points per side that is 3,072 logit maps of 256 x 256 per image, and
the two upscaled maps before them are once and twice the size of the prompt's tokens: written out and read back,
they are much of the mask decoder's memory traffic.

:func:`mask_statistics` computes the same in one pass: each program takes a block of one prompt's tokens, keeps
both upscalings in registers, and writes only the mask bits and three counts per mask (area, above +1, above
-1). Its matrix products follow the inputs' dtype: bf16 tokens multiply in bf16, fp32 ones in TF32 where
the process's fp32 products run in TF32 (:func:`covt.compute.tf32_matmuls`, ``precompute.tf32``), in three
TF32 products each otherwise (near fp32). On the CPU it runs only in Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported; slow, for tests; the interpreter's bf16 products are wrong, so its tests run
fp32): SamAnchor uses it on CUDA devices only.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from segment_anything.modeling import Sam
from triton.runtime.errors import OutOfResources

from covt.compute import tf32_matmuls

from .sam_fast import hypernetwork_outputs, transposed_conv_as_linear

MASK_COLUMNS = 16  # the hypernetwork outputs padded to the smallest width tl.dot takes
SQRT_HALF = tl.constexpr(0.7071067811865476)  # a kernel reads only constexpr globals


@triton.jit
def mask_statistics_kernel(tokens_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, w2_ptr, b2_ptr, hyper_ptr,
                           masks_ptr, counts_ptr, n_tokens, width, eps, threshold, offset,
                           C: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, M: tl.constexpr,
                           MP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                           SUBPIXELS: tl.constexpr = 4):
    """Program (prompt, token block, part): ``BLOCK`` tokens, and ``SUBPIXELS`` of the first upscaling's 4 sub-pixels,
    from ``part * SUBPIXELS`` on (4: all of them; fewer: more programs, each with less on chip). The sub-pixel loops
    are unrolled at compile time (``tl.static_range``): the kernel's loops as ``tl.range`` (pipelined, or unrolled by
    a factor) made autotuning runs stop on an illegal memory access on an H100 (BENCHMARKS.md)."""
    prompt = tl.program_id(0).to(tl.int64)  # prompt * n_tokens * C passes 2**31 from 2,048 prompts per call
    dtype = tokens_ptr.dtype.element_ty  # the products'
    rc, rc1, rc2, rm = tl.arange(0, C), tl.arange(0, C1), tl.arange(0, C2), tl.arange(0, MP)
    hyper = tl.load(hyper_ptr + prompt * C2 * MP + rc2[:, None] * MP + rm[None, :]).to(dtype)  # (C2, MP)
    norm_w, norm_b = tl.load(norm_w_ptr + rc1), tl.load(norm_b_ptr + rc1)
    side = 4 * width
    area = tl.zeros((MP,), dtype=tl.int32)
    inner = tl.zeros((MP,), dtype=tl.int32)
    outer = tl.zeros((MP,), dtype=tl.int32)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # token index y * width + x
    valid = t < n_tokens
    x = tl.load(tokens_ptr + prompt * n_tokens * C + t[:, None] * C + rc[None, :], mask=valid[:, None], other=0.0)
    y, xx = t // width, t % width
    for k in tl.static_range(SUBPIXELS):
        s1 = tl.program_id(2) * SUBPIXELS + k  # the first upscaling's sub-pixel (di, dj)
        w1 = tl.load(w1_ptr + s1 * C * C1 + rc[:, None] * C1 + rc1[None, :])  # (C, C1)
        h = tl.dot(x, w1, input_precision=PRECISION) + tl.load(b1_ptr + s1 * C1 + rc1)[None, :]
        mean = tl.sum(h, axis=1) / C1
        centred = h - mean[:, None]
        var = tl.sum(centred * centred, axis=1) / C1
        h = centred / tl.sqrt(var + eps)[:, None] * norm_w[None, :] + norm_b[None, :]
        h = (0.5 * h * (1.0 + tl.math.erf(h * SQRT_HALF))).to(dtype)  # GELU (erf), as nn.GELU
        for s2 in tl.static_range(4):  # second upscaling's sub-pixel (ei, ej)
            w2 = tl.load(w2_ptr + s2 * C1 * C2 + rc1[:, None] * C2 + rc2[None, :])  # (C1, C2)
            g = tl.dot(h, w2, input_precision=PRECISION) + tl.load(b2_ptr + s2 * C2 + rc2)[None, :]
            g = (0.5 * g * (1.0 + tl.math.erf(g * SQRT_HALF))).to(dtype)
            logits = tl.dot(g, hyper, input_precision=PRECISION)  # (BLOCK, MP): columns past M are padding
            row = 4 * y + 2 * (s1 // 2) + s2 // 2
            col = 4 * xx + 2 * (s1 % 2) + s2 % 2
            keep = valid[:, None] & (rm[None, :] < M)
            on = logits > threshold
            pixel = masks_ptr + prompt * M * side * side + rm[None, :] * side * side + (row * side + col)[:, None]
            tl.store(pixel, on.to(tl.int8), mask=keep)
            area += tl.sum((on & keep).to(tl.int32), axis=0)
            inner += tl.sum(((logits > offset) & keep).to(tl.int32), axis=0)
            outer += tl.sum(((logits > -offset) & keep).to(tl.int32), axis=0)
    counts = counts_ptr + prompt * 3 * M
    tl.atomic_add(counts + rm, area, mask=rm < M)
    tl.atomic_add(counts + M + rm, inner, mask=rm < M)
    tl.atomic_add(counts + 2 * M + rm, outer, mask=rm < M)


@triton.jit
def grouped_mask_statistics_kernel(tokens_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, w2_ptr, b2_ptr, hyper_ptr,
                                   masks_ptr, counts_ptr, n_tokens, width, eps, threshold, offset,
                                   C: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, M: tl.constexpr,
                                   MG: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                                   GROUP: tl.constexpr):
    """Program (prompt, token block): the same statistics in wider products. ``GROUP`` of the first upscaling's 4
    sub-pixels per product (N = GROUP * C1); the second upscaling's 4 sub-pixels in one product (N = 4 * C2) over the
    rows (token, sub-pixel of the group); the masks' contraction with the hypernetwork outputs laid out block-diagonal,
    (4 * C2, 4 * MG), one column per (second sub-pixel, mask)."""
    prompt = tl.program_id(0).to(tl.int64)  # prompt * n_tokens * C passes 2**31 from 2,048 prompts per call
    dtype = tokens_ptr.dtype.element_ty
    rc, rc1, rg1 = tl.arange(0, C), tl.arange(0, C1), tl.arange(0, GROUP * C1)
    r2, rcol, rm = tl.arange(0, 4 * C2), tl.arange(0, 4 * MG), tl.arange(0, MG)
    hyper = tl.load(hyper_ptr + prompt * 16 * C2 * MG + r2[:, None] * 4 * MG + rcol[None, :]).to(dtype)
    # the weights per sub-pixel, (4, in, out), read as (in, sub-pixels x out)
    w2 = tl.load(w2_ptr + (r2 // C2)[None, :] * C1 * C2 + rc1[:, None] * C2 + (r2 % C2)[None, :])  # (C1, 4 * C2)
    b2 = tl.load(b2_ptr + r2)
    norm_w, norm_b = tl.load(norm_w_ptr + rc1), tl.load(norm_b_ptr + rc1)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(tokens_ptr + prompt * n_tokens * C + t[:, None] * C + rc[None, :], mask=(t < n_tokens)[:, None],
                other=0.0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK * GROUP) // GROUP  # the token of each (token, sub-pixel)
    s2, m = rcol // MG, rcol % MG
    keep = (rows < n_tokens)[:, None] & (m < M)[None, :]
    side = 4 * width
    area = tl.zeros((4 * MG,), dtype=tl.int32)
    inner = tl.zeros((4 * MG,), dtype=tl.int32)
    outer = tl.zeros((4 * MG,), dtype=tl.int32)
    for first in tl.static_range(0, 4, GROUP):  # the group's first sub-pixel of the first upscaling
        w1 = tl.load(w1_ptr + (first + rg1 // C1)[None, :] * C * C1 + rc[:, None] * C1 + (rg1 % C1)[None, :])
        h = tl.dot(x, w1, input_precision=PRECISION) + tl.load(b1_ptr + first * C1 + rg1)[None, :]
        h = tl.reshape(h, (BLOCK, GROUP, C1))
        mean = tl.sum(h, axis=2) / C1
        centred = h - mean[:, :, None]
        var = tl.sum(centred * centred, axis=2) / C1
        h = centred / tl.sqrt(var + eps)[:, :, None] * norm_w[None, None, :] + norm_b[None, None, :]
        h = (0.5 * h * (1.0 + tl.math.erf(h * SQRT_HALF))).to(dtype)  # GELU (erf), as nn.GELU
        g = tl.dot(tl.reshape(h, (BLOCK * GROUP, C1)), w2, input_precision=PRECISION) + b2[None, :]
        g = (0.5 * g * (1.0 + tl.math.erf(g * SQRT_HALF))).to(dtype)
        logits = tl.dot(g, hyper, input_precision=PRECISION)  # (BLOCK * GROUP, 4 * MG)
        s1 = first + tl.arange(0, BLOCK * GROUP) % GROUP
        row = 4 * (rows // width)[:, None] + (2 * (s1 // 2))[:, None] + (s2 // 2)[None, :]
        col = 4 * (rows % width)[:, None] + (2 * (s1 % 2))[:, None] + (s2 % 2)[None, :]
        on = logits > threshold
        tl.store(masks_ptr + prompt * M * side * side + m[None, :] * side * side + row * side + col, on.to(tl.int8),
                 mask=keep)
        area += tl.sum((on & keep).to(tl.int32), axis=0)
        inner += tl.sum(((logits > offset) & keep).to(tl.int32), axis=0)
        outer += tl.sum(((logits > -offset) & keep).to(tl.int32), axis=0)
    out = counts_ptr + prompt * 3 * M + rm
    tl.atomic_add(out, tl.sum(tl.reshape(area, (4, MG)), axis=0), mask=rm < M)
    tl.atomic_add(out + M, tl.sum(tl.reshape(inner, (4, MG)), axis=0), mask=rm < M)
    tl.atomic_add(out + 2 * M, tl.sum(tl.reshape(outer, (4, MG)), axis=0), mask=rm < M)


def runs_on(device: torch.device) -> bool:
    """Whether :func:`mask_statistics` runs for tensors on ``device``: CUDA, or anywhere under the interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


# On a GPU the block of tokens per program is tuned once per shape: larger blocks load the upscalings' weights
# (about 150 KB per program in bf16) fewer times, smaller ones keep more programs in flight. One of the first
# upscaling's sub-pixels per program: these three ran on an H100 with fp32 tokens (128 x 8 fastest, 45 TFLOP/s).
# With bf16 tokens every launch with the 4 sub-pixels in one program (255 registers and 0.2-1.4 KB of spills per
# thread, ptxas sm_90a) stopped on an illegal memory access there, and so did 64 x 8 with one (BENCHMARKS.md, issue
# 19): kernel_for refuses them. Tuning runs the kernel several times, so the counts it adds into are zeroed before
# each run.
MASK_KERNEL_CONFIGS = [({"BLOCK": block, "SUBPIXELS": 1}, warps) for block, warps in ((32, 4), (64, 8), (128, 8))]
tuned_mask_statistics_kernel = triton.autotune(
    configs=[triton.Config(kwargs, num_warps=warps) for kwargs, warps in MASK_KERNEL_CONFIGS],
    key=["n_tokens", "C", "C1", "C2", "PRECISION"], reset_to_zero=["counts_ptr"],
)(mask_statistics_kernel)
# The grouped kernel's (ptxas, sm_90a, bf16): 214 registers and no spills at 32 tokens x 8 warps with the 4 sub-pixels
# in one product; 255 and 0.2-0.4 KB of spills at 64-128 x 8 (16 x 4 and 32 x 4 spill 1.3-1.5 KB: left out). All five
# ran on an H100 in bf16, 32 x 8 x 4 fastest (66 TFLOP/s). With fp32 tokens only 64 x 8 with one sub-pixel per
# product fits in shared memory (172 KB; the autotuner skips the others).
GROUPED_KERNEL_CONFIGS = [({"BLOCK": block, "GROUP": group}, warps) for block, group, warps in (
    (32, 4, 8), (64, 4, 8), (64, 2, 8), (64, 1, 8), (128, 1, 8))]
tuned_grouped_mask_statistics_kernel = triton.autotune(
    configs=[triton.Config(kwargs, num_warps=warps) for kwargs, warps in GROUPED_KERNEL_CONFIGS],
    key=["n_tokens", "C", "C1", "C2", "PRECISION"], reset_to_zero=["counts_ptr"],
)(grouped_mask_statistics_kernel)
# kernel name -> (the kernel, its autotuned launcher)
MASK_KERNELS = {"subpixels": (mask_statistics_kernel, tuned_mask_statistics_kernel),
                "grouped": (grouped_mask_statistics_kernel, tuned_grouped_mask_statistics_kernel)}


@dataclass
class MaskStatistics:
    """Per prompt and mask: the mask (logit > threshold) and its pixel counts."""

    masks: torch.Tensor  # (n, M, 4h, 4w) bool
    area: torch.Tensor  # (n, M) pixels above the threshold
    inner: torch.Tensor  # (n, M) pixels above +offset
    outer: torch.Tensor  # (n, M) pixels above -offset


def statistics_of_logits(logits: torch.Tensor, threshold: float, offset: float) -> MaskStatistics:
    """The same statistics from mask logits ``(n, M, H, W)`` (the unfused path)."""
    masks = logits > threshold
    return MaskStatistics(masks, masks.sum((-1, -2)), (logits > offset).sum((-1, -2)),
                          (logits > -offset).sum((-1, -2)))


def kernel_for(kernel: str, dtype: torch.dtype, on_gpu: bool, refuse: bool = True) -> str:
    """The kernel (a key of :data:`MASK_KERNELS`) that ``precompute.sam.mask_kernel`` names for tokens of ``dtype``.
    ``auto``: grouped for half-precision tokens, per-sub-pixel for fp32 ones (on an H100: bf16 grouped 66 TFLOP/s;
    fp32 per-sub-pixel 45, grouped 13, as only its narrowest configuration fits in shared memory). The per-sub-pixel
    kernel with half-precision tokens stopped on an illegal memory access on H100s (its autotuning, and launches
    with 4 and with 1 sub-pixel per program; BENCHMARKS.md, issue 19), so a GPU refuses it (``refuse=False``: runs
    it, to find the fault, bench only)."""
    if kernel == "auto":
        return "subpixels" if dtype == torch.float32 else "grouped"
    if kernel not in MASK_KERNELS:
        raise ValueError(f"unknown mask kernel {kernel!r}: one of auto, {', '.join(MASK_KERNELS)}")
    if kernel == "subpixels" and on_gpu and dtype != torch.float32 and refuse:
        raise ValueError(f"precompute.sam.mask_kernel=subpixels with {dtype} tokens: on H100s that kernel stopped on "
                         "an illegal memory access, autotuned and at fixed launches (BENCHMARKS.md, issue 19); use "
                         "precompute.sam.mask_kernel=auto or grouped")
    return kernel


def launch_kernel(launch: dict) -> str:
    """The kernel (a key of :data:`MASK_KERNELS`) a launch configuration is for: grouped when it sets ``GROUP``."""
    return "grouped" if "GROUP" in launch else "subpixels"


def launch_grid(prompts: int, tokens: int, launch: dict) -> tuple[int, ...]:
    """The kernel's programs: per prompt, per ``BLOCK`` tokens, per ``SUBPIXELS`` of the 4 (grouped: per prompt, per
    ``BLOCK`` tokens)."""
    if launch_kernel(launch) == "grouped":
        return (prompts, triton.cdiv(tokens, launch["BLOCK"]))
    return (prompts, triton.cdiv(tokens, launch["BLOCK"]), 4 // launch["SUBPIXELS"])


def parse_launch(text: str) -> dict:
    """A launch configuration from its name: ``BLOCKxWARPSxSUBPIXELS`` (the per-sub-pixel kernel) or
    ``gBLOCKxWARPSxGROUP`` (grouped), either with an optional ``sSTAGES`` suffix (``num_stages``)."""
    text, _, stages = text.partition("s")
    pipeline = {"num_stages": int(stages)} if stages else {}
    if text.startswith("g"):
        block, warps, group = [int(v) for v in text[1:].split("x")]
        return {"BLOCK": block, "num_warps": warps, "GROUP": group, **pipeline}
    block, warps, subpixels = [int(v) for v in text.split("x")]
    return {"BLOCK": block, "num_warps": warps, "SUBPIXELS": subpixels, **pipeline}


def kernel_hyper(hyper: torch.Tensor, kernel: str) -> tuple[torch.Tensor, dict]:
    """The hypernetwork outputs ``(n, M, C2)`` as ``kernel`` reads them, and its width constant: ``(n, C2, MP)``
    zero-padded to MP columns; grouped, block-diagonal over the second upscaling's 4 sub-pixels, ``(n, 4 * C2, 4 *
    MG)`` with [s * C2 + c, s * MG + j] = hyper[j, c] (MG: the masks padded to a power of two, 4 x MG >= 16)."""
    n, m, c2 = hyper.shape
    hyper = hyper.float()
    if kernel == "grouped":
        mg = max(4, triton.next_power_of_2(m))
        padded = torch.nn.functional.pad(hyper, (0, 0, 0, mg - m)).transpose(1, 2)  # (n, C2, MG)
        eye = torch.eye(4, device=hyper.device, dtype=hyper.dtype)
        return torch.einsum("st,ncj->nsctj", eye, padded).reshape(n, 4 * c2, 4 * mg).contiguous(), {"MG": mg}
    return torch.nn.functional.pad(hyper.transpose(1, 2), (0, MASK_COLUMNS - m)).contiguous(), {"MP": MASK_COLUMNS}


def kernel_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    """The kernel's ``tl.dot`` precision for tokens of ``dtype``. It applies to fp32 operands only (bf16 ones multiply
    in bf16 either way): TF32 where the process's fp32 products run in TF32 (``precompute.tf32``). Without TF32 a GPU
    runs three TF32 products per product ("tf32x3", near fp32): Triton's plain fp32 ("ieee") products unroll to FMAs
    that ptxas took over ten minutes to compile at 64 tokens per program; the interpreter runs "ieee"."""
    if dtype != torch.float32 or (on_gpu and tf32_matmuls()):
        return "tf32"
    return "tf32x3" if on_gpu else "ieee"


@contextmanager
def fitting_launch(kernel: str, device: str):
    """Says which switch to turn off where none of ``kernel``'s autotuned configurations fits the GPU's shared memory
    or registers (an H100 fits them all; an A100's 164 KB per block misses the widest)."""
    try:
        yield
    except OutOfResources as e:
        raise RuntimeError(f"the fused mask kernel ({kernel}) has no launch configuration that fits {device}: {e}. "
                           "Turn precompute.sam.fused_masks off (or try precompute.sam.mask_kernel="
                           f"{'subpixels' if kernel == 'grouped' else 'grouped'})") from e


def mask_statistics(sam: Sam, keys: torch.Tensor, mask_tokens: torch.Tensor, threshold: float,
                    offset: float, launch: dict | None = None, kernel: str = "auto",
                    refuse: bool = True) -> MaskStatistics:
    """:func:`statistics_of_logits` of ``multimask_logits(sam, keys, mask_tokens)`` without the logits: ``keys``
    (n, h*w, C) the prompts' image tokens, ``mask_tokens`` (n, M, C) their multimask token outputs.
    ``kernel``: one of :data:`MASK_KERNELS`, or ``auto`` (:func:`kernel_for`, with ``refuse``). ``launch``: the
    kernel's launch configuration (``BLOCK``, ``SUBPIXELS``, ``num_warps``; grouped: ``BLOCK``, ``GROUP``,
    ``num_warps``; :func:`parse_launch`) in place of the autotuner's on a GPU (bench/bench_mask_kernel.py) or of one
    program per prompt in the interpreter."""
    kernel = kernel_for(kernel, keys.dtype, keys.is_cuda, refuse)
    if launch is not None and launch_kernel(launch) != kernel:
        raise ValueError(f"launch {launch} is for the {launch_kernel(launch)} mask kernel, not {kernel}")
    md = sam.mask_decoder
    h, w = sam.prompt_encoder.image_embedding_size
    conv1, norm, _, conv2, _ = md.output_upscaling
    n, m = mask_tokens.shape[:2]
    c, c1, c2 = keys.shape[-1], conv1.out_channels, conv2.out_channels
    # the upscalings' weights per sub-pixel, (4, in, out), in the products' dtype: loaded once per program as the
    # dot takes them, not cast there
    w1, b1 = transposed_conv_as_linear(conv1)
    w2, b2 = transposed_conv_as_linear(conv2)
    w1 = w1.view(4, c1, c).transpose(1, 2).to(keys.dtype).contiguous()
    w2 = w2.view(4, c2, c1).transpose(1, 2).to(keys.dtype).contiguous()
    hyper, width = kernel_hyper(hypernetwork_outputs(md, mask_tokens, first_token=1), kernel)
    masks = torch.empty((n, m, 4 * h, 4 * w), dtype=torch.int8, device=keys.device)
    counts = torch.zeros((n, 3, m), dtype=torch.int32, device=keys.device)
    if n:
        precision = kernel_precision(keys.dtype, keys.is_cuda)
        args = (keys.contiguous(), w1, b1.float().contiguous(), norm.weight.float().contiguous(),
                norm.bias.float().contiguous(), w2, b2.float().contiguous(), hyper, masks,
                counts, h * w, w, norm.eps, threshold, offset)
        shape = {"C": c, "C1": c1, "C2": c2, "M": m, "PRECISION": precision, **width}
        plain, tuned = MASK_KERNELS[kernel]
        if keys.is_cuda and launch is None:
            with fitting_launch(kernel, torch.cuda.get_device_name(keys.device)):
                tuned[lambda meta: launch_grid(n, h * w, meta)](*args, **shape)
        else:  # the interpreter's cost is per operation, not per element: by default one program per prompt
            # (grouped: at most 1,024 tokens, the interpreter's largest tensor being (4 x BLOCK, 4 x C2))
            whole = triton.next_power_of_2(h * w)
            launch = {**({"BLOCK": min(whole, 1024), "GROUP": 4} if kernel == "grouped" else
                         {"BLOCK": whole, "SUBPIXELS": 4}), **(launch or {})}
            plain[launch_grid(n, h * w, launch)](*args, **shape, **launch)
    return MaskStatistics(masks.view(torch.bool), counts[:, 0], counts[:, 1], counts[:, 2])
