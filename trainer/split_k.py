"""The LoRA adapters' thin products with their long reductions split across the GPU (``lora.split_k``).

At rank 16 four of an adapter's products have an output only 16 wide: ``lora_A``'s forward ``x @ A.T``
(tokens x 16, summed over the layer's input width) and its weight gradient (16 x input width, summed over the
tokens); ``lora_B``'s input gradient (tokens x 16, summed over its output width) and its weight gradient (output
width x 16, summed over the tokens). A GEMM kernel tiles its output, so a 608 x 16 output is a handful of tiles for
132 multiprocessors, each walking the whole reduction alone. Here the reduction is cut into slices that run as one
batched product (views, no copies), and the slices' partial products are summed in fp32: the same product, in
more tiles. The wide products (``lora_B``'s forward, ``lora_A``'s input gradient) run as before. In bf16 each
slice's partial product is rounded to bf16 before the sum (a GEMM kernel rounds once, at the end): a few more bf16
roundings of the same size.
"""
from __future__ import annotations

import torch

MIN_SLICE = 256  # reduction elements per slice; fewer leave each tile too little work for its launch
MAX_SLICES = 16
TOKEN_SLICES = 8  # the weight gradients' reduction over the micro-batch's tokens: a fixed count, since the tokens
#                   are a dynamic size under torch.compile and a count chosen from them would be guarded on


def slice_count(length: int) -> int:
    """Slices for a reduction over a layer's width ``length``."""
    return max(1, min(MAX_SLICES, length // MIN_SLICE))


def width_slices(out_features: int, in_features: int) -> tuple[int, int]:
    """Slices of a Linear's forward and of its input gradient: only the thin one of the two, the product whose
    output is the narrow side (``lora_A``'s forward, ``lora_B``'s input gradient), is split."""
    forward = slice_count(in_features) if out_features < in_features else 1
    input_grad = slice_count(out_features) if in_features < out_features else 1
    return forward, input_grad


def split_k_matmul(a: torch.Tensor, b: torch.Tensor, slices: int, tokens: bool = False) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (m, k) and ``b`` (k, n), the k reduction in ``slices`` batched slices summed in fp32 (or
    wider; what is left of k past a whole number of slices in one more product). ``tokens``: k is the micro-batch's
    token count, a dynamic size under torch.compile, which the slices must not branch on (each branch a guard, and
    a recompilation of every block when it flips): the rest then always holds 1 to ``slices`` tokens, never none."""
    k = a.shape[1]
    if slices <= 1 or (not tokens and k < slices):
        return a @ b
    step = (k - 1) // slices if tokens else k // slices
    whole = step * slices
    parts = torch.bmm(a[:, :whole].unflatten(1, (slices, step)).transpose(0, 1),
                      b[:whole].unflatten(0, (slices, step)))
    accumulate = torch.promote_types(a.dtype, torch.float32)
    out = parts.sum(0, dtype=accumulate)
    if tokens or whole < k:
        out = out + (a[:, whole:] @ b[whole:]).to(accumulate)
    return out.to(a.dtype)


class ThinLinear(torch.autograd.Function):
    """``x @ weight.T`` (no bias) for an adapter's 2-D input and weight in one dtype, with each of its thin
    products split: the forward where the output is the rank (``lora_A``), the input gradient where the input is
    (``lora_B``), the weight gradient always (one of the weight's sides is the rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        forward_slices, _ = width_slices(*weight.shape)
        return split_k_matmul(x, weight.T, forward_slices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            _, input_grad_slices = width_slices(*weight.shape)
            grad_x = split_k_matmul(grad, weight, input_grad_slices)
        if ctx.needs_input_grad[1]:
            grad_w = split_k_matmul(grad.T, x, TOKEN_SLICES, tokens=True)
        return grad_x, grad_w


def thin_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:class:`ThinLinear` of ``x`` (..., in) under the caller's autocast: both operands in the autocast dtype
    where it is on (as ``F.linear`` would compute), else in ``x``'s; the casts are autograd's, so the fp32 weight
    gets its gradient in fp32."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        out = ThinLinear.apply(x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype))
    return out.unflatten(0, x.shape[:-1])


class SplitKLinear(torch.nn.Linear):
    """An adapter's ``lora_A`` or ``lora_B`` computed by :func:`thin_linear` (``lora.split_k``,
    :func:`trainer.lora.use_split_k`). Layers take this class in place (``__class__``), as
    :class:`trainer.lora.DropoutThenLinear` does, so compiled blocks guard on one forward for every layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return thin_linear(x, self.weight)

