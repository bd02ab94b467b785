"""A prototype, timed by bench_adapters.py before any use in the trainer: a LoRA adapter's ``lora_A(dropout(x))``
as two Triton kernels that never store the dropped input or its mask.

peft computes ``lora_B(lora_A(dropout(x)))``. Its dropout writes a dropped copy of the adapter's input and a mask,
and keeps both for the backward pass, and then the rank-16 product reads the copy again: per input element about
5 bytes moved in the forward and 7 in the backward (bf16), for almost no arithmetic. Here:

- the forward reads ``x`` once, draws each element's keep/drop from Philox (``tl.rand``) with a seed from torch's
  generator, and accumulates the rank-r product (fp32) in registers;
- the backward draws the same bits again from the same seed and offsets. One kernel reads ``x`` and the
  gradient of the product, and writes the input's gradient (dropped as the forward dropped) while it adds the
  weight's gradient (fp32, atomically) per tile.

It is the same function as dropout then the product (the same masks: :func:`keep_mask` draws them for the
checks), in other random bits than torch's dropout. On the CPU it runs only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before import; tests in fp32: the interpreter's bf16 products are wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_K = 32, 64


@triton.jit
def dropped_product_forward(x_ptr, w_ptr, seed_ptr, out_ptr, M, K, R, chunk, p, scale,
                            BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
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
        acc += tl.dot(dropped, w.to(x.dtype))
    tl.atomic_add(out_ptr + rows[:, None] * R + ranks[None, :], acc, mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def dropped_product_backward(x_ptr, w_ptr, grad_ptr, seed_ptr, dx_ptr, dw_ptr, M, K, R, p, scale,
                             BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """One (BM, BK) tile: dx = (grad @ w) * keep * scale, and dw[:, tile] += grad.T @ dropout(x) (fp32, atomic)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    keep = tl.rand(tl.load(seed_ptr), rows[:, None] * K + cols[None, :]) >= p
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)
    grad = tl.load(grad_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                   other=0.0).to(x.dtype)
    w = tl.load(w_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0).to(x.dtype)
    dx = tl.where(keep, tl.dot(grad, w) * scale, 0.0)
    tl.store(dx_ptr + rows[:, None] * K + cols[None, :], dx.to(x.dtype), mask=inside)
    dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
    tl.atomic_add(dw_ptr + ranks[:, None] * K + cols[None, :], tl.dot(tl.trans(grad), dropped),
                  mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit
def keep_bits(seed_ptr, out_ptr, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = tl.rand(tl.load(seed_ptr), rows[:, None] * K + cols[None, :]) >= p
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot takes dimensions of 16 or more


def k_chunks(rows: int, k: int, device: torch.device) -> int:
    """How many programs share each row block's K: enough row blocks x chunks to fill the GPU's multiprocessors."""
    blocks = triton.cdiv(rows, BLOCK_M)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(k, BLOCK_K), triton.cdiv(2 * sms, blocks)))


def keep_mask(shape: tuple[int, int], seed: torch.Tensor, p: float) -> torch.Tensor:
    """The keep (True) / drop bits the kernels draw for an input of ``shape`` (rows, features) with ``seed``."""
    out = torch.empty(shape, dtype=torch.int8, device=seed.device)
    keep_bits[(triton.cdiv(shape[0], BLOCK_M), triton.cdiv(shape[1], BLOCK_K))](
        seed, out, shape[0], shape[1], p, BM=BLOCK_M, BK=BLOCK_K)
    return out.bool()


class DroppedProduct(torch.autograd.Function):
    """``F.linear(F.dropout(x, p), weight)`` (no bias) without the dropped input or mask kept; ``seed`` a one-element
    int64 tensor on ``x``'s device. The product in ``x``'s dtype with fp32 sums, as under autocast; the weight's
    gradient in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        (m, k), r = flat.shape, weight.shape[0]
        out = torch.zeros(m, r, dtype=torch.float32, device=x.device)
        chunks = k_chunks(m, k, x.device)
        chunk = triton.cdiv(triton.cdiv(k, chunks), BLOCK_K) * BLOCK_K
        dropped_product_forward[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, chunk))](
            flat, weight.contiguous(), seed, out, m, k, r, chunk, p, 1.0 / (1.0 - p),
            BM=BLOCK_M, BK=BLOCK_K, BR=rank_block(r))
        ctx.save_for_backward(flat, weight, seed)
        ctx.p, ctx.shape = p, x.shape
        return out.to(x.dtype).view(*x.shape[:-1], r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, seed = ctx.saved_tensors
        (m, k), r = flat.shape, weight.shape[0]
        dx = torch.empty_like(flat)
        dw = torch.zeros(r, k, dtype=torch.float32, device=flat.device)
        dropped_product_backward[(triton.cdiv(m, BLOCK_M), triton.cdiv(k, BLOCK_K))](
            flat, weight.contiguous(), grad.reshape(m, r).contiguous(), seed, dx, dw, m, k, r, ctx.p,
            1.0 / (1.0 - ctx.p), BM=BLOCK_M, BK=BLOCK_K, BR=rank_block(r))
        return dx.view(ctx.shape), dw.to(weight.dtype), None, None


def fused_lora_a(linear: torch.nn.Linear, p: float, x: torch.Tensor) -> torch.Tensor:
    """An adapter's ``lora_A(dropout(x))`` through :class:`DroppedProduct` while training (a fresh seed from torch's
    generator on ``x``'s device each call); the plain product otherwise."""
    if not (linear.training and p and torch.is_grad_enabled()) or linear.bias is not None:
        return linear(torch.nn.functional.dropout(x, p, linear.training))
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return DroppedProduct.apply(x.to(dtype), linear.weight, seed, p)
