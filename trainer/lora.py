"""LoRA on Qwen2.5-VL (peft): which modules get adapters, trainable new-token rows, merging.

Adapters go on the linear layers of the language model's decoder layers and, with
``lora.vision_tower``, of the vision tower's blocks whose leaf name is one of
``lora.target_modules`` (Qwen2.5-VL names: q/k/v/o_proj, gate/up/down_proj in the
LLM; attn.qkv, attn.proj and mlp.gate/up/down_proj in the vision blocks), and with
``lora.merger`` on both Linear layers of the vision tower's patch merger: with the
defaults that is every Linear of the LLM and the vision tower, as in the reference
(its LoRA targets every Linear but those of embed_tokens, lm_head and the heads). The
patch embedding (a Conv3d also called ``proj``) and the lm_head are left alone, and
the anchor heads are not part of the VLM at all.

The rows of the added thought tokens train in full through peft's
``trainable_token_indices`` on the input embedding and, when it is not tied, the
lm_head; the rest of both matrices stays frozen.

With ``lora.enabled: false`` (full-parameter training) no adapter is attached: every parameter of the VLM
trains (the thought-token rows with the rest of their matrices), and merging is a no-op.
"""
from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterable

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils.checkpoint import checkpoint

from covt.config import LoraConfig


def _submodule_prefix(vlm: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in vlm.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def lora_target_pattern(vlm: torch.nn.Module, lora: LoraConfig) -> str:
    """A regex (peft full-matches it) naming exactly the Linear layers that get LoRA."""
    towers = [
        (_submodule_prefix(vlm, vlm.model.language_model), "layers", True),
        (_submodule_prefix(vlm, vlm.model.visual), "blocks", lora.vision_tower),
    ]
    wanted = set(lora.target_modules)
    alternatives, found = [], set()
    for prefix, blocks, use in towers:
        leaves = set()
        for name, m in vlm.named_modules():
            if isinstance(m, torch.nn.Linear) and re.fullmatch(rf"{re.escape(prefix)}\.{blocks}\.\d+\.\w+\.\w+", name):
                leaf = name.rsplit(".", 1)[1]
                if leaf in wanted:
                    leaves.add(leaf)
        found |= leaves  # names of the vision tower are fine in the list even when it gets no LoRA
        if leaves and use:
            alternatives.append(rf"{re.escape(prefix)}\.{blocks}\.\d+\.\w+\.(?:{'|'.join(sorted(leaves))})")
    if lora.merger and lora.vision_tower:
        merger = _submodule_prefix(vlm, vlm.model.visual.merger)
        linears = [n for n, m in vlm.named_modules() if n.startswith(merger + ".") and isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError(f"train.lora.merger: {type(vlm).__name__}'s patch merger has no Linear layer")
        alternatives += [re.escape(n) for n in linears]
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(
            f"train.lora.target_modules: {missing} match no Linear layer in the language model or vision tower "
            f"blocks of this {type(vlm).__name__} (Qwen2.5-VL names: q_proj k_proj v_proj o_proj gate_proj up_proj "
            "down_proj, vision qkv proj)"
        )
    return "^(?:" + "|".join(alternatives) + ")$"


def attach_lora(vlm: torch.nn.Module, lora: LoraConfig, new_token_ids: Iterable[int]) -> torch.nn.Module:
    """Wrap ``vlm`` with a fresh LoRA; the rows of ``new_token_ids`` train in full.

    Everything else is frozen. Trainable tensors (adapters, token rows) are kept in
    fp32 even when the base is bf16, so the optimizer updates them at full precision.
    With ``lora.enabled`` false, ``vlm`` itself is returned with every parameter trainable (in fp32).
    """
    if not lora.enabled:
        vlm.requires_grad_(True)
        return keep_trainable_in_fp32(vlm)
    token_ids = sorted(set(int(i) for i in new_token_ids))
    tied = bool(getattr(vlm.config, "tie_word_embeddings", False))
    if not token_ids:
        token_indices = None
    elif tied:  # peft keeps the tied lm_head in sync with the embedding's rows
        token_indices = {"embed_tokens": token_ids}
    else:
        token_indices = {"embed_tokens": token_ids, "lm_head": token_ids}
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_pattern(vlm, lora),
        trainable_token_indices=token_indices,
        bias="none",
    )
    model = keep_trainable_in_fp32(get_peft_model(vlm, config))
    cast_adapter_inputs(adapter_layers(model), lora.fp32_inputs)
    recompute_adapter_dropout(adapter_layers(model), lora.recompute_dropout)
    index_token_rows_once(model)
    return model


def index_token_rows_once(model: torch.nn.Module) -> int:
    """Give peft's trainable-token layers (the thought-token rows of the embedding and lm_head) a
    ``get_merged_weights`` that keeps their row index on the weights' device, made once per device. peft's builds
    it from a Python list at every forward and copies it from pageable memory: the host waits there for the GPU to
    finish all queued work, twice per forward, and a CUDA graph (train.cuda_graphs) cannot hold such a copy. The
    same rows and values otherwise (``tests/test_trainer_lora.py``). Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    for layer in layers:
        layer.row_indices = {}
        layer.get_merged_weights = types.MethodType(merged_token_rows, layer)
    return len(layers)


def merged_token_rows(layer: TrainableTokensLayer, active_adapters) -> torch.Tensor:
    """The layer's weight with each active adapter's trained rows written in (what peft's method computes)."""
    weight = layer.base_layer.weight
    for name in active_adapters:
        key = (name, weight.device)
        if key not in layer.row_indices:
            layer.row_indices[key] = torch.tensor(layer.token_indices[name], device=weight.device)
        weight = weight.index_copy(0, layer.row_indices[key], layer.trainable_tokens_delta[name].to(weight))
    return weight


def adapter_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def cast_adapter_inputs(layers: Iterable[BaseTunerLayer], enabled: bool) -> None:
    """Whether these LoRA layers copy their input to their weights' dtype (peft's ``cast_input_dtype_enabled``)."""
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled


def dropout_then_linear(linear: torch.nn.Linear, p: float, x: torch.Tensor) -> torch.Tensor:
    """An adapter's ``lora_A(dropout(x))`` whose dropped input is made again in the backward pass instead of kept:
    the non-reentrant checkpoint restores the random state, so the masks are the same ones (the same loss and
    gradients), and only ``x`` stays saved, which the base layer keeps anyway. The recomputation stops once the
    dropped input is made: the product does not run twice."""
    if linear.training and p and torch.is_grad_enabled():
        return checkpoint(dropped_linear, linear.weight, linear.bias, p, x, use_reentrant=False)
    return dropped_linear(linear.weight, linear.bias, p, x, linear.training)


def dropped_linear(weight: torch.Tensor, bias: torch.Tensor | None, p: float, x: torch.Tensor,
                   training: bool = True) -> torch.Tensor:
    return torch.nn.functional.linear(torch.nn.functional.dropout(x, p, training), weight, bias)


def recompute_adapter_dropout(layers: Iterable[BaseTunerLayer], enabled: bool) -> int:
    """Whether these LoRA layers' dropout is made again in the backward pass (:func:`dropout_then_linear`) rather
    than kept: peft's ``lora_B(lora_A(dropout(x)))`` keeps each adapter's dropped copy of its input and the mask,
    ``lora.recompute_dropout``. Reversible; the state dict does not change. Returns the adapters switched."""
    switched = 0
    for layer in (layer for layer in layers if isinstance(layer, LoraLayer)):
        for name, lora_a in layer.lora_A.items():
            patched = isinstance(lora_a.__dict__.get("forward"), functools.partial)
            dropout = layer.lora_dropout[name]
            if enabled and not patched and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                lora_a.forward = functools.partial(dropout_then_linear, lora_a, dropout.p)
                layer.lora_dropout[name] = torch.nn.Identity()
                switched += 1
            elif not enabled and patched:
                layer.lora_dropout[name] = torch.nn.Dropout(lora_a.forward.args[1]).train(lora_a.training)
                del lora_a.forward
                switched += 1
    return switched


def keep_trainable_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def stop_token_row_gradients(model: PeftModel) -> int:
    """Zero the gradient of the added tokens' rows: they stay optimizer parameters, so AdamW's weight decay
    still shrinks them, but nothing trains them. What the reference's row mask does after its first merge,
    where the merged tokenizer already holds the tokens and the masked range is empty. Returns the count."""
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    for p in rows:
        p.register_hook(torch.zeros_like)
    return len(rows)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LoRA adapters and trained token rows into the base weights; returns the plain model (a model
    trained full-parameter, without peft, is already plain: returned as it is)."""
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.requires_grad_(False)
    return merged


def trainable_summary(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"
