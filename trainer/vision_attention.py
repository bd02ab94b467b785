"""Variable-length attention for Qwen2.5-VL's vision tower, in one kernel call per layer.

transformers' Qwen2.5-VL vision blocks attend within windows (112x112 pixels: 64 patches)
in 28 of their 32 layers. With ``sdpa`` they split the sequence at ``cu_seqlens`` and
call attention once per window (16 windows per 448x448 image, 452 calls per image per
forward pass), each call a tiny kernel launched from the host; only implementations
whose name contains "flash" get the whole sequence with ``cu_seqlens``. This module
registers such an implementation, :data:`VISION_ATTENTION`, backed by PyTorch's own
``torch.nn.attention.varlen.varlen_attn`` (Flash/cuDNN varlen kernels, with backward),
so every window of every image of a micro-batch is one call. Where that kernel cannot
run (CPU, fp32, an old torch) it computes the same function with one SDPA call per
segment, exactly as transformers' ``sdpa`` path does.

Use :func:`use_varlen_vision_attention` on a loaded model; the language model keeps
its own implementation (``sdpa``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.host_inputs import longest_segment
from trainer.model import unwrap_vlm

VISION_ATTENTION = "covt_flash_varlen"  # "flash" in the name routes cu_seqlens to us (transformers' dispatch)


def varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def varlen_kernel_available() -> bool:
    return varlen_kernel() is not None and torch.cuda.is_available()


def varlen_kernel_applies(query: torch.Tensor) -> bool:
    """True where ``varlen_attn`` runs: CUDA tensors in bf16/fp16 and a torch that has it."""
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and varlen_kernel() is not None


def per_segment(query, key, value, cu_seqlens: torch.Tensor, scaling: float | None,
                causal: bool = False) -> torch.Tensor:
    """(S, H, D) queries, (S, H_kv, D) keys and values -> (S, H, D): one SDPA call per segment (the library's
    sdpa path; ``causal`` within each segment, grouped-query where H_kv < H). While a CUDA graph is recorded the
    segments' lengths cannot be read to the host: then one call with a block-diagonal mask computes the same."""
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        return block_diagonal(query, key, value, cu_seqlens, scaling, causal)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scaling,
                                           is_causal=causal, enable_gqa=gqa)
            for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths))]
    return torch.cat(outs, dim=1).transpose(0, 1)


def block_diagonal(query, key, value, cu_seqlens: torch.Tensor, scaling: float | None,
                   causal: bool = False) -> torch.Tensor:
    """:func:`per_segment`'s attention as one SDPA call whose mask keeps each position within its segment, built
    on the device from ``cu_seqlens`` (no host read; memory grows with the square of the sequence)."""
    positions = torch.arange(query.shape[0], device=query.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask = mask & (positions[None, :] <= positions[:, None])
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(0, 1)


def vision_varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                            is_causal=False, **kwargs):
    """transformers attention-interface function: (1, H, S, D) q/k/v and cu_seqlens -> ((1, S, H, D), None)."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or dropout:
        raise ValueError(f"{VISION_ATTENTION} serves the vision tower's non-causal, unmasked, dropout-free "
                         "attention with cu_seqlens only")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D)
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if varlen_kernel_applies(q):
        max_len = int(max_length_q) if max_length_q is not None else longest_segment(cu)
        out = varlen_kernel()(q, k, v, cu, cu, max_len, max_len, scale=scaling)
    else:
        out = per_segment(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, vision_varlen_attention)


def use_varlen_vision_attention(vlm) -> None:
    """Switch the vision tower of a (possibly peft-wrapped) Qwen2.5-VL model to :data:`VISION_ATTENTION`."""
    register()
    base = unwrap_vlm(vlm)
    visual = getattr(getattr(base, "model", base), "visual", None)
    if visual is None:
        raise TypeError(f"{type(base).__name__} has no vision tower (model.visual); expected Qwen2.5-VL")
    visual.config._attn_implementation = VISION_ATTENTION
