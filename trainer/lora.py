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
from trainer.split_k import SplitKLinear, thin_linear


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
    replace_adapter_dropout(adapter_layers(model), lora.recompute_dropout)
    use_split_k(adapter_layers(model), lora.split_k)
    use_separate_token_rows(model, lora.separate_token_rows)
    return model


def use_separate_token_rows(model: torch.nn.Module, enabled: bool) -> int:
    """How peft's trainable-token layers (the thought-token rows of the embedding and lm_head) run their forward.

    ``enabled`` (``lora.separate_token_rows``): the frozen matrix does the lookup or product as it is, and only the
    rows' own embeddings or logit columns come from the trained rows (:func:`token_rows_forward`). peft's path
    copies the whole matrix with the rows written in at every forward (1.1 GB for Qwen2.5-VL-7B's 152k x 3584
    bf16 embedding, and again for its untied lm_head), and its backward makes the whole matrix's gradient to keep
    20 of its rows. Disabled, peft's path runs, with its row index kept on the weights' device (made once per
    device: peft copies it from pageable memory at every forward, where the host waits for the GPU and a CUDA
    graph cannot hold the copy). The same embeddings and, within the matrix product's rounding, logits and
    gradients either way (``tests/test_trainer_lora.py``). Reversible. Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    for layer in layers:
        if "row_indices" not in vars(layer):
            layer.row_indices = {}
            layer.get_merged_weights = types.MethodType(merged_token_rows, layer)
            layer.forward_adapters = types.MethodType(token_rows_forward, layer)
        layer.rows_apart = enabled
    return len(layers)


def merged_token_rows(layer: TrainableTokensLayer, active_adapters) -> torch.Tensor:
    """The layer's weight with each active adapter's trained rows written in (what peft's method computes)."""
    weight = layer.base_layer.weight
    for name in active_adapters:
        weight = weight.index_copy(0, token_row_index(layer, name, weight.device),
                                   layer.trainable_tokens_delta[name].to(weight))
    return weight


def token_row_index(layer: TrainableTokensLayer, name: str, device: torch.device) -> torch.Tensor:
    """The adapter's row numbers in the matrix, on ``device`` (made once per device)."""
    key = (name, device)
    if key not in layer.row_indices:
        layer.row_indices[key] = torch.tensor(layer.token_indices[name], device=device)
    return layer.row_indices[key]


def token_row_slots(layer: TrainableTokensLayer, name: str, device: torch.device) -> torch.Tensor:
    """For each row of the matrix, its place among the adapter's trained rows, or -1 (made once per device)."""
    key = ("slots", name, device)
    if key not in layer.row_indices:
        slots = torch.full((layer.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
        rows = token_row_index(layer, name, device)
        layer.row_indices[key] = slots.index_copy(0, rows, torch.arange(len(rows), device=device))
    return layer.row_indices[key]


def rows_apart_apply(layer: TrainableTokensLayer, active_adapters) -> bool:
    """Whether :func:`token_rows_forward` computes what peft's forward would: one active, unmerged adapter on a
    plain embedding (no max_norm renormalising rows, no sparse or frequency-scaled gradient, no embed_scale) or a
    Linear without bias (peft's own path drops a bias)."""
    base = layer.base_layer
    if not layer.rows_apart or layer.disable_adapters or layer.merged or len(active_adapters) != 1:
        return False
    if isinstance(base, torch.nn.Embedding):
        return (base.max_norm is None and not base.sparse and not base.scale_grad_by_freq
                and getattr(base, "embed_scale", None) is None)
    return isinstance(base, torch.nn.Linear) and base.bias is None


def token_rows_forward(layer: TrainableTokensLayer, x: torch.Tensor, active_adapters, *args, **kwargs):
    """peft's trainable-token forward without the merged matrix (:func:`use_separate_token_rows`)."""
    if not rows_apart_apply(layer, active_adapters):
        return TrainableTokensLayer.forward_adapters(layer, x, active_adapters, *args, **kwargs)
    name = active_adapters[0]
    base = layer.base_layer
    rows = layer.trainable_tokens_delta[name].to(base.weight)
    out = base(x)  # the frozen matrix, as loaded: no gradient, no copy
    if isinstance(base, torch.nn.Embedding):
        slots = token_row_slots(layer, name, x.device).index_select(0, x.reshape(-1)).view_as(x)
        trained = torch.nn.functional.embedding(slots.clamp(min=0), rows)
        return torch.where(slots.unsqueeze(-1) >= 0, trained, out)
    columns = torch.nn.functional.linear(x, rows)
    return out.index_copy(out.dim() - 1, token_row_index(layer, name, out.device), columns.to(out.dtype))


def adapter_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def cast_adapter_inputs(layers: Iterable[BaseTunerLayer], enabled: bool) -> None:
    """Whether these LoRA layers copy their input to their weights' dtype (peft's ``cast_input_dtype_enabled``)."""
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled


PLAIN_LINEARS = (torch.nn.Linear, SplitKLinear)  # an adapter's Linear as peft makes it, or only split-K


def dropout_then_linear(linear: torch.nn.Linear, p: float, x: torch.Tensor, split: bool = False) -> torch.Tensor:
    """An adapter's ``lora_A(dropout(x))`` whose dropped input is made again in the backward pass instead of kept:
    the non-reentrant checkpoint restores the random state, so the masks are the same ones (the same loss and
    gradients), and only ``x`` stays saved, which the base layer keeps anyway. The recomputation stops once the
    dropped input is made: the product does not run twice. ``split``: the product split-K
    (:func:`trainer.split_k.thin_linear`)."""
    if linear.training and p and torch.is_grad_enabled():
        return checkpoint(dropped_linear, linear.weight, linear.bias, p, x, True, split, use_reentrant=False)
    return dropped_linear(linear.weight, linear.bias, p, x, linear.training, split)


def dropped_linear(weight: torch.Tensor, bias: torch.Tensor | None, p: float, x: torch.Tensor,
                   training: bool = True, split: bool = False) -> torch.Tensor:
    dropped = torch.nn.functional.dropout(x, p, training)
    if split and bias is None:
        return thin_linear(dropped, weight)
    return torch.nn.functional.linear(dropped, weight, bias)


class DropoutThenLinear(torch.nn.Linear):
    """An adapter's ``lora_A`` that drops out its own input with :func:`dropout_then_linear`, in place of peft's
    dropout module in front of it (``lora.recompute_dropout``). Adapters take this class in place
    (``lora_A.__class__``) rather than a forward of their own: compiled blocks then guard on one function for every
    layer. Under torch 2.11 a forward bound to each layer failed the guards of every block compiled before it, and
    on the 7B model's 60 blocks dynamo's limit of 64 recompilations left the last ones eager (tests/test_compile.py).
    ``split_k``: its product split-K as well (``lora.split_k``)."""

    dropout_p: float
    split_k: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_then_linear(self, self.dropout_p, x, self.split_k)


def replace_adapter_dropout(layers: Iterable[BaseTunerLayer], recompute: bool) -> int:
    """Computes these LoRA layers' ``lora_A(dropout(x))`` as :class:`DropoutThenLinear` (``recompute``), or with
    peft's dropout module again. peft's ``lora_B(lora_A(dropout(x)))`` keeps each adapter's dropped copy of its input
    and the mask for the backward pass; the replacement does not. A split-K ``lora_A`` (:func:`use_split_k`) stays
    split-K either way. Reversible; the state dict does not change. Returns the adapters switched."""
    switched = 0
    for layer in (layer for layer in layers if isinstance(layer, LoraLayer)):
        for name, lora_a in layer.lora_A.items():
            dropout = layer.lora_dropout[name]
            if recompute and type(lora_a) in PLAIN_LINEARS and isinstance(dropout, torch.nn.Dropout) and dropout.p:
                split = type(lora_a) is SplitKLinear
                lora_a.__class__, lora_a.dropout_p, lora_a.split_k = DropoutThenLinear, dropout.p, split
                layer.lora_dropout[name] = torch.nn.Identity()
            elif not recompute and type(lora_a) is DropoutThenLinear:
                layer.lora_dropout[name] = torch.nn.Dropout(lora_a.dropout_p).train(lora_a.training)
                lora_a.__class__ = SplitKLinear if lora_a.split_k else torch.nn.Linear
                del lora_a.dropout_p, lora_a.split_k
            else:
                continue
            switched += 1
    return switched


def use_split_k(layers: Iterable[BaseTunerLayer], enabled: bool) -> int:
    """Computes these LoRA layers' ``lora_A`` and ``lora_B`` products split-K (``enabled``,
    :class:`trainer.split_k.SplitKLinear`; a ``lora_A`` that drops out its own input, :class:`DropoutThenLinear`,
    keeps its class and splits its product), or as plain Linears again. Bias-free Linears only. Reversible; the
    state dict does not change. Returns the Linears switched."""
    switched = 0
    for layer in (layer for layer in layers if isinstance(layer, LoraLayer)):
        for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
            if linear.bias is not None:
                continue
            if type(linear) is DropoutThenLinear:
                switched += linear.split_k != enabled
                linear.split_k = enabled
            elif type(linear) in PLAIN_LINEARS:
                switched += (type(linear) is SplitKLinear) != enabled
                linear.__class__ = SplitKLinear if enabled else torch.nn.Linear
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
