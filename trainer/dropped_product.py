"""An adapter's ``lora_A(dropout(x))`` as two Triton kernels that never store the dropped input or its mask
(``train.lora.fused_dropout``).

peft computes ``lora_B(lora_A(dropout(x)))``. Its dropout writes a dropped copy of the adapter's input and a mask,
keeps both for the backward pass, and the rank-r product then reads the copy again: per input element about 5 bytes
moved in the forward and 7 in the backward (bf16), for almost no arithmetic. Here:

- the forward reads ``x`` once, draws each element's keep/drop from Philox (``tl.rand``) with a seed drawn from
  torch's generator, and accumulates the rank-r product (fp32) in registers;
- the backward draws the same bits again from the same seed and offsets. One kernel reads ``x`` and the gradient of
  the product, writes the input's gradient (dropped as the forward dropped), and sums the weight's gradient over
  a group of row blocks in registers before adding it (fp32, atomically) once per group.

The same function as dropout then the product, with the same masks (:func:`keep_mask` draws them for the checks), in
other random bits than torch's dropout. The kernels are registered as ``torch.library.triton_op``\\ s, so
``torch.compile`` keeps them inside a compiled block and a CUDA graph replays them (a fresh seed per replay: the seed
comes from torch's generator, which graphs advance). On the CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

BLOCK_M, BLOCK_K = 32, 64
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it once, at its import


@triton.jit
def dropped_product_forward(x_ptr, w_ptr, seed_ptr, out_ptr, M, K, R, chunk, p, scale,
                            BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, r] += sum over this program's K chunk of dropout(x)[m, k] * w[r, k] (out: fp32, zeroed)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for start in range(tl.program_id(1) * chunk, tl.minimum((tl.program_id(1) + 1) * chunk, K), BK):
        cols = start + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)
        keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        w = tl.load(w_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < K),
                    other=0.0)
        acc += tl.dot(dropped, w.to(x.dtype), input_precision=PRECISION)
    tl.atomic_add(out_ptr + rows[:, None] * R + ranks[None, :], acc, mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def dropped_product_backward(x_ptr, w_ptr, grad_ptr, seed_ptr, dx_ptr, dw_ptr, M, K, R, group, p, scale,
                             BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr):
    """``group`` row blocks of one BK-wide column block: dx = (grad @ w) * keep * scale for each, and
    dw[:, columns] += grad.T @ dropout(x) summed over them in registers, then added once (fp32, atomic)."""
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    seed = tl.load(seed_ptr)
    w = tl.load(w_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0)
    dw = tl.zeros((BR, BK), dtype=tl.float32)
    for block in range(tl.program_id(0) * group, tl.minimum((tl.program_id(0) + 1) * group, tl.cdiv(M, BM))):
        rows = block * BM + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)
        grad = tl.load(grad_ptr + rows[:, None] * R + ranks[None, :],
                       mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(x.dtype)
        dx = tl.where(keep, tl.dot(grad, w.to(x.dtype), input_precision=PRECISION) * scale, 0.0)
        tl.store(dx_ptr + rows[:, None] * K + cols[None, :], dx.to(x.dtype), mask=inside)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        dw += tl.dot(tl.trans(grad), dropped, input_precision=PRECISION)
    tl.atomic_add(dw_ptr + ranks[:, None] * K + cols[None, :], dw, mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit
def keep_bits(seed_ptr, out_ptr, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = tl.rand(tl.load(seed_ptr), rows[:, None] * K + cols[None, :]) >= p
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def dot_precision() -> str:
    """How the kernels multiply fp32 inputs: in TF32 only where torch's own fp32 products may
    (``torch.backends.cuda.matmul.allow_tf32``, which ``train.tf32`` sets); bf16 inputs are multiplied as they are."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot takes dimensions of 16 or more


def programs_wanted(device: torch.device) -> int:
    """Four programs per multiprocessor, so that loads in flight hide memory's latency (4 in all where there is no
    GPU: the interpreter)."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def k_chunks(rows: int, k: int, device: torch.device) -> int:
    """How many programs share each row block's K in the forward: enough programs to fill the GPU."""
    return max(1, min(triton.cdiv(k, BLOCK_K), triton.cdiv(programs_wanted(device), triton.cdiv(rows, BLOCK_M))))


def row_group(rows: int, k: int, device: torch.device) -> int:
    """How many row blocks each backward program takes (one atomic sum of the weight's gradient per program, not
    per tile): as many as keep the GPU filled."""
    return max(1, triton.cdiv(rows, BLOCK_M) * triton.cdiv(k, BLOCK_K) // programs_wanted(device))


def keep_mask(shape: tuple[int, int], seed: torch.Tensor, p: float) -> torch.Tensor:
    """The keep (True) / drop bits the kernels draw for an input of ``shape`` (rows, features) with ``seed``."""
    out = torch.empty(shape, dtype=torch.int8, device=seed.device)
    keep_bits[(triton.cdiv(shape[0], BLOCK_M), triton.cdiv(shape[1], BLOCK_K))](
        seed, out, shape[0], shape[1], p, BM=BLOCK_M, BK=BLOCK_K)
    return out.bool()


@triton_op("covt::dropped_product", mutates_args=())
def dropped_product(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``F.linear(F.dropout(x, p), weight)`` for a contiguous (rows, features) ``x`` and a (rank, features) weight
    without bias; ``seed`` a one-element int64 tensor on ``x``'s device. The product in ``x``'s dtype with fp32
    sums, as under autocast."""
    (m, k), r = x.shape, weight.shape[0]
    out = torch.zeros(m, r, dtype=torch.float32, device=x.device)
    chunk = triton.cdiv(triton.cdiv(k, k_chunks(m, k, x.device)), BLOCK_K) * BLOCK_K
    wrap_triton(dropped_product_forward)[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, chunk))](
        x, weight, seed, out, m, k, r, chunk, p, 1.0 / (1.0 - p), BM=BLOCK_M, BK=BLOCK_K, BR=rank_block(r),
        PRECISION=dot_precision())
    return out.to(x.dtype)


@triton_op("covt::dropped_product_backward", mutates_args=())
def dropped_product_gradients(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, seed: torch.Tensor,
                              p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`dropped_product` for its input (``x``'s dtype) and its weight (the weight's)."""
    (m, k), r = x.shape, weight.shape[0]
    dx = torch.empty_like(x)
    dw = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    group = row_group(m, k, x.device)
    wrap_triton(dropped_product_backward)[(triton.cdiv(triton.cdiv(m, BLOCK_M), group), triton.cdiv(k, BLOCK_K))](
        x, weight, grad, seed, dx, dw, m, k, r, group, p, 1.0 / (1.0 - p), BM=BLOCK_M, BK=BLOCK_K,
        BR=rank_block(r), PRECISION=dot_precision())
    return dx, dw.to(weight.dtype)


def keep_for_backward(ctx, inputs, output) -> None:
    x, weight, seed, p = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.p = p


def backward(ctx, grad: torch.Tensor):
    x, weight, seed = ctx.saved_tensors
    dx, dw = dropped_product_gradients(x, weight, grad.contiguous(), seed, ctx.p)
    return dx, dw, None, None


dropped_product.register_autograd(backward, setup_context=keep_for_backward)


@register_flop_formula(torch.ops.covt.dropped_product)
def product_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """What torch's FlopCounterMode counts for the forward: the rank-r product's, as for ``F.linear``."""
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


@register_flop_formula(torch.ops.covt.dropped_product_backward)
def gradient_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """The backward's two products, the input's gradient and the weight's."""
    return 4 * x_shape[0] * x_shape[1] * weight_shape[0]


def fused_lora_a(linear: torch.nn.Linear, p: float, x: torch.Tensor) -> torch.Tensor:
    """An adapter's ``lora_A(dropout(x))`` through :func:`dropped_product` while training (a fresh seed from
    torch's generator on ``x``'s device each call); the plain product otherwise (evaluation, no gradients)."""
    if not (linear.training and p and torch.is_grad_enabled()) or linear.bias is not None:
        return linear(torch.nn.functional.dropout(x, p, linear.training))
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"train.lora.fused_dropout: the adapters' dropout kernels run on CUDA, and this input is "
                           f"on {x.device.type}: set train.lora.fused_dropout=false")
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    flat = x.to(dtype).reshape(-1, x.shape[-1]).contiguous()
    return dropped_product(flat, linear.weight.contiguous(), seed, p).view(*x.shape[:-1], linear.weight.shape[0])
