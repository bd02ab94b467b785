"""A LoRA layer as one autograd function whose adapter accumulates in place (``train.lora.accumulate_in_place``).

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` operator by operator: the adapter's
output is written, scaled and added to the frozen product's (three passes over an output-sized tensor), and the
backward pass scales the gradient, drops out the adapter's input gradient and sums it with the frozen product's, each
a pass of its own. At rank 16 these passes, not the products, are what an adapter costs: on an H100 they add about
70% to the time of the frozen projections of a 7B decoder layer (BENCHMARKS.md, issue 19).

Here the adapter's product goes into the frozen product's output inside the GEMM (``addmm``, the scaling as its
alpha), the scaling moves onto the rank-r tensors, and the adapter's input gradient is masked and added into the
frozen product's in one pass. The same function with the same dropout masks (each device's own draw, as
``torch.nn.functional.dropout`` makes it); the sums round once where peft rounds twice.
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer's products run in: autocast's dtype where it is on (as ``F.linear`` under autocast), else the
    input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(dropout(x), keep, scale)`` with ``dropout(x) = x * keep * scale``: the mask torch's dropout draws on this
    device (its fused kernel's on CUDA, a Bernoulli draw already divided by ``1 - p`` elsewhere, so
    ``torch.nn.functional.dropout`` with the same random state drops the same elements)."""
    if p == 0:
        return x, None, 1.0
    if x.is_cuda:
        out, keep = torch.native_dropout(x, p, True)
        return out, keep, 1.0 / (1.0 - p)
    keep = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * keep, keep, 1.0


class AdaptedLinear(torch.autograd.Function):
    """``x @ weight.T + bias + scaling * dropout(x) @ lora_a.T @ lora_b.T`` for a frozen ``weight`` and ``bias``,
    every product in ``dtype``; gradients for ``x``, ``lora_a`` and ``lora_b``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        out = rows @ weight.t() if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
        rows_dropped, keep, scale = dropped(rows, p)
        low = rows_dropped @ lora_a.t()
        out = torch.addmm(out, low, lora_b.t(), alpha=scaling)  # not addmm_: FlopCounterMode counts addmm only
        ctx.save_for_backward(rows_dropped, keep, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.scale, ctx.x_shape, ctx.x_dtype = scaling, scale, x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows_dropped, keep, low, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
        grad_low = grad @ (lora_b * ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            if keep is None:
                grad_x = torch.addmm(grad_x, grad_low, lora_a)
            else:
                grad_x.addcmul_(grad_low @ lora_a, keep, value=ctx.scale)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = grad_low.t() @ rows_dropped
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ low).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def plain_adapter(layer: LoraLinear, args: tuple, kwargs: dict) -> str | None:
    """The active adapter of ``layer`` where :class:`AdaptedLinear` computes what peft's forward would: one plain
    LoRA adapter (no DoRA or other variant, no bias of its own) over a frozen, unmerged ``nn.Linear``, called with
    the input alone; else None."""
    base = layer.get_base_layer()
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant
            or type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad) or layer.lora_B[active[0]].bias is not None):
        return None
    return active[0]


class AccumulatingLoraLinear(LoraLinear):
    """peft's LoRA Linear computing through :class:`AdaptedLinear` where that applies (:func:`plain_adapter`), else
    as peft does. Layers take this class in place (``layer.__class__``) rather than a forward of their own: compiled
    blocks then guard on one function for every layer. Under torch 2.11 a forward bound to each layer failed the
    guards of every block compiled before it (60 blocks past dynamo's limit of 64 recompilations, the rest eager)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = plain_adapter(self, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        base = self.get_base_layer()
        return AdaptedLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   self.scaling[name], p, compute_dtype(x))
