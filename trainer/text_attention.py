"""Causal attention per sample for the language model on packed rows (train.packing), in one kernel call.

transformers keeps the samples of a packed row apart by turning its restarting text positions into a
block-diagonal causal mask (trainer.host_inputs.packed_position_ids); with ``sdpa`` the kernel then computes every
pair of the row's tokens and discards those across samples (7/8 of them in a packed micro-batch of 8).
:data:`TEXT_ATTENTION` computes the same function per sample instead: on CUDA in bf16/fp16 one causal
``torch.nn.attention.varlen.varlen_attn`` call (grouped-query) with the samples' boundaries as cu_seqlens,
elsewhere one causal SDPA call per sample. Rows that are not packed (no text positions reach the layer) go to
transformers' own sdpa with its mask, unchanged.

:func:`use_packed_text_attention` installs it on a loaded model; the trainer does so when train.packing is on.
For training only: a row of one batch whose text positions reach the layer is taken for a packed row (what
trainer.model.vlm_inputs passes); generation with a cache or a padding mask must keep transformers' sdpa.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch

from trainer.host_inputs import longest_segment
from trainer.model import PACKED_ROWS_NEED_NO_MASK, unwrap_vlm
from trainer.vision_attention import per_segment, varlen_kernel, varlen_kernel_applies

TEXT_ATTENTION = "covt_packed_text"


class SampleBoundaries:
    """cu_seqlens (int32) and the longest sample of a packed row, from its text positions (0 starts a sample), for
    a packed row given without the loader's boundaries (trainer.host_inputs.packed_text_boundaries).

    Every decoder layer of one forward pass receives the same positions tensor: the boundaries are read once per
    pass (one host sync, as the padded path's rope index has), not once per layer."""

    def __init__(self):
        self.positions = None  # weak reference to the positions tensor the cached boundaries belong to
        self.value: tuple[torch.Tensor, int] | None = None

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.positions is None or self.positions() is not position_ids:
            row = position_ids.reshape(-1)
            starts = (row == 0).nonzero().flatten()
            cu = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32)
            self.value = (cu, longest_segment(cu))
            self.positions = weakref.ref(position_ids)
        return self.value


sample_boundaries = SampleBoundaries()


@functools.cache
def causal_options(kernel) -> tuple[tuple[str, object], ...]:
    """The keywords that make ``kernel`` (a torch release's ``varlen_attn``) causal and grouped-query, read once."""
    params = inspect.signature(kernel).parameters
    options = [("window_size", (-1, 0)) if "window_size" in params else ("is_causal", True)]
    if "enable_gqa" in params:
        options.append(("enable_gqa", True))
    return tuple(options)


def causal_varlen(q, k, v, cu: torch.Tensor, longest: int, scaling: float | None) -> torch.Tensor:
    """One causal grouped-query ``varlen_attn`` call over (T, H, D) queries and (T, H_kv, D) keys and values. Its
    keywords changed across torch releases (2.11's has no ``enable_gqa``; one without ``window_size`` is asked with
    ``is_causal``): the key/value heads are repeated where the kernel cannot group them itself."""
    kernel = varlen_kernel()
    options = dict(causal_options(kernel))
    if not options.get("enable_gqa") and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return kernel(q, k, v, cu, cu, longest, longest, scale=scaling, **options)


def packed_text_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                          **kwargs):
    """transformers attention-interface function: (1, H, T, D) queries of a packed row and its text positions
    -> ((1, T, H, D), None); anything else goes to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:  # not a packed training row
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"{TEXT_ATTENTION} (train.packing) serves dropout-free attention only; the model's "
                         f"attention_dropout is {dropout}")
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:  # from the loader
        cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    else:
        cu, longest = sample_boundaries(position_ids)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    if varlen_kernel_applies(q):
        out = causal_varlen(q, k, v, cu, longest, scaling)
    else:
        out = per_segment(q, k, v, cu, scaling, causal=True)
    return out.unsqueeze(0), None


def use_packed_text_attention(vlm) -> None:
    """Switch the language model of a (possibly peft-wrapped) Qwen2.5-VL model to :data:`TEXT_ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TEXT_ATTENTION, packed_text_attention)
    AttentionMaskInterface.register(TEXT_ATTENTION, sdpa_mask)  # rows that are not packed keep sdpa's own mask
    language_model = getattr(getattr(unwrap_vlm(vlm), "model", None), "language_model", None)
    if language_model is None:
        raise TypeError(f"{type(unwrap_vlm(vlm)).__name__} has no language model (model.language_model); "
                        "train.packing expects Qwen2.5-VL")
    language_model.config._attn_implementation = TEXT_ATTENTION
    setattr(language_model, PACKED_ROWS_NEED_NO_MASK, True)


def use_sdpa_text_attention(vlm) -> None:
    """Undo :func:`use_packed_text_attention`: the language model back to transformers' sdpa, its masks built."""
    language_model = unwrap_vlm(vlm).model.language_model
    language_model.config._attn_implementation = "sdpa"
    setattr(language_model, PACKED_ROWS_NEED_NO_MASK, False)
