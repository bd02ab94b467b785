"""The CoVT model: transformers' Qwen2.5-VL plus one head per anchor, by composition.

``CoVTModel.forward(batch, anchor_losses)`` runs the VLM on a :func:`trainer.batch.build_batch`
batch with labels (the text loss), reads the last-layer hidden states (the output of the
language model's final norm, the states the lm_head reads), gathers each anchor's pad
positions into ``(B_a, tokens, hidden)`` "visual thoughts" and, when anchor losses are on,
scores them with that anchor's head against the cached targets. Under ``train.cuda_graphs`` an anchor's
part holds every row, and ``carries`` says which ones drew its thoughts: the others add no loss.

The loss is the reference's: text cross-entropy + the sum of the anchor losses (each head
already carries the reference's own scale, e.g. depth x 0.005, dino x 0.5); with anchor
losses off, the text loss alone. ``train.loss_weights`` is an optional extra multiplier
per anchor (default 1, the reference). With ``every_head`` (under DeepSpeed, several ranks or
one) every head runs at every micro-batch: one with nothing to score adds an exact zero
(:meth:`CoVTModel.placeholder_part` says why).
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo import config as dynamo_config

from trainer.batch import batch_to, sample_count
from trainer.host_inputs import VisionGeometry
from trainer.tokens import ThoughtTokens

# set on a language model whose attention finds a packed row's samples without a mask (trainer.text_attention)
PACKED_ROWS_NEED_NO_MASK = "covt_packed_rows_need_no_mask"
# the output that counts the rows of a micro-batch carrying an anchor's thoughts, with parts over every row
# (train.cuda_graphs): that anchor's part is then there at every micro-batch, and a step logs it where one row
# carried it (trainer.train.carried_parts), as a direct step logs the parts of the micro-batches that have them
CARRIED_ROWS = ".carried_rows"
# what the loader computed for the vision tower (trainer.host_inputs.vision_inputs)
VISION_INPUTS = ("image_position_ids", "image_cu_seqlens", "image_max_seqlen", "image_window_index",
                 "image_cu_window_seqlens", "image_max_window_seqlen")
VLM_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids",
              "position_ids", *VISION_INPUTS, "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def unwrap_vlm(vlm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``vlm`` itself)."""
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


def text_config(vlm: nn.Module):
    config = unwrap_vlm(vlm).config
    return getattr(config, "text_config", config)


def text_hidden_size(vlm: nn.Module) -> int:
    return int(text_config(vlm).hidden_size)


def gather_thoughts(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[rows[i], positions[i, j]]`` as ``(len(rows), positions.shape[1], hidden)``."""
    rows = rows.to(hidden.device)
    positions = positions.to(hidden.device)
    return hidden[rows[:, None], positions]


class CoVTModel(nn.Module):
    def __init__(self, vlm: nn.Module, heads: nn.ModuleDict, tokens: ThoughtTokens,
                 loss_weights: dict[str, float] | None = None, every_head: bool = False):
        super().__init__()
        self.vlm = vlm
        self.heads = heads
        self.tokens = tokens
        self.loss_weights = dict(loss_weights or {})
        self.every_head = every_head
        unknown = sorted(set(self.loss_weights) - set(heads.keys()))
        if unknown:
            raise KeyError(f"train.loss_weights names anchors without a head: {unknown} (heads: {list(heads.keys())})")
        hidden = text_hidden_size(vlm)
        for name, head in heads.items():
            if getattr(head, "hidden_size", hidden) != hidden:
                raise ValueError(f"head {name!r} expects hidden size {head.hidden_size}, the VLM has {hidden}")
        self.heads_compiled = False  # compile_heads
        self.padding_mask = True  # train.padding_mask

    def compile_heads(self, enabled: bool = True) -> None:
        """train.compile_heads: each head's decoding and loss run through ``torch.compile``
        (``AnchorHead.compile_parts``), which compiles at the head's first shapes (with gradients only);
        ``enabled=False`` goes back to the eager heads, the compiled code kept.
        The compiled functions share the heads' parameters and are not submodules: the state dict is unchanged."""
        if enabled:
            for head in self.heads.values():
                if head.compiled_parts is None:
                    head.compile_parts()
        self.heads_compiled = enabled

    def view_sizes(self) -> dict[str, int | None]:
        """anchor -> side of the uint8 views its head wants (for build_batch)."""
        return {name: getattr(head, "view_size", None) for name, head in self.heads.items()}

    def vision_geometry(self) -> VisionGeometry:
        """What the vision tower's index tensors follow from (for build_batch, which makes them on the host)."""
        vision = unwrap_vlm(self.vlm).config.vision_config
        return VisionGeometry(vision.spatial_merge_size, vision.window_size, vision.patch_size)

    def forward(self, batch: dict[str, Any], anchor_losses: bool = True) -> dict[str, Any]:
        """``loss``: the mean over the micro-batch's samples of (text loss + weighted anchor losses), so that
        averaging micro-batches (gradient accumulation, ranks) gives the same number however a global batch
        is cut; the logged parts (``text``, one per anchor that has thoughts in the micro-batch) are detached
        tensors, read by the caller once per optimizer step (no device sync here)."""
        hidden = last_hidden_states(self.vlm, batch, self.padding_mask)
        size = sample_count(batch)
        text_loss = labelled_text_loss(hidden, batch["text"], unwrap_vlm(self.vlm).lm_head) / size
        total = text_loss
        parts: dict[str, torch.Tensor] = {"text": text_loss.detach()}
        anchors = batch.get("anchors", {}) if anchor_losses else {}
        unknown = [a for a in anchors if a not in self.heads]
        if unknown:
            raise KeyError(f"batch carries anchors {unknown} but there is no head for them "
                           f"(heads: {list(self.heads.keys())})")
        for anchor in self.heads:  # in the heads' order, so every rank builds (and back-propagates) one graph
            part = anchors.get(anchor)
            if part is not None and len(part["rows"]):
                # each row that carries this anchor's thoughts adds its loss; samples without them (stage 4
                # subsets, plain answers) add zero, as they do in the reference
                losses = self.anchor_loss(anchor, hidden, part, per_row=True)
                carries = part.get("carries")  # a part over every row (trainer.batch): 1 where thoughts are
                if carries is None:
                    carried, count = losses.sum(), len(part["rows"])
                else:
                    carries = carries.to(losses.device, losses.dtype)
                    carried, count = (losses * carries).sum(), carries.sum().clamp(min=1)
                    parts[anchor + CARRIED_ROWS] = carries.sum()
                total = total + self.loss_weights.get(anchor, 1.0) * carried / size
                parts[anchor] = (carried / count).detach()  # the head's loss: a mean over those rows
            elif self.every_head:
                total = total + self.anchor_loss(anchor, hidden, self.placeholder_part(anchor)) * 0.0
        return {"loss": total, **parts}

    def placeholder_part(self, anchor: str) -> dict[str, Any]:
        """A one-row anchor part for a head that has no thoughts to score: the first sample's first positions
        and the head's all-zero targets. Why (``every_head``): under DeepSpeed every rank must produce a
        gradient for the same parameters in the same order at every micro-batch (ZeRO reduces them in buckets
        filled in the order the gradients arrive; a rank whose micro-batch has no thoughts of an anchor, in
        stage 4's subsets and plain answers or the text-only tail, would otherwise send fewer or other ones:
        a collective mismatch, or slices of different parameters summed). Running the head's whole
        computation on this row, times 0.0, gives its parameters exact zero gradients in the order a real
        row does; DeepSpeed counts a missing gradient as zero, so the update is unchanged. Not in plain
        PyTorch (one process): there a parameter without a gradient is left alone by AdamW, and a zero would
        still move it (momentum, weight decay)."""
        head = self.heads[anchor]
        targets, views = head.zero_targets(1)
        return {"rows": torch.zeros(1, dtype=torch.long), "positions": torch.arange(head.num_tokens)[None],
                "targets": targets, "views": views}

    def anchor_loss(self, anchor: str, hidden: torch.Tensor, part: dict[str, Any],
                    per_row: bool = False) -> torch.Tensor:
        """The head's loss on ``part``'s thoughts (each row's, with ``per_row``)."""
        head = self.heads[anchor]
        thoughts = gather_thoughts(hidden, part["rows"], part["positions"])
        param = next(head.parameters(), None)
        if param is not None and param.is_floating_point():
            thoughts = thoughts.to(param.dtype)
        # without gradients (evaluation, a few batches) the eager heads: a no-grad variant of each would compile again
        return head(thoughts, batch_to(part["targets"], hidden.device), batch_to(part.get("views"), hidden.device),
                    per_row=per_row, compiled=self.heads_compiled and torch.is_grad_enabled())


def last_hidden_states(vlm: nn.Module, inputs: dict[str, Any], padding_mask: bool = True) -> torch.Tensor:
    """The last-layer hidden states of a (peft-wrapped) Qwen2.5-VL: the output of the language model's final
    norm, what lm_head reads and the heads are trained on, ``(B, T, hidden)``. Runs the model without its
    lm_head (no logits); ``inputs`` may hold labels and other keys, only the VLM's inputs are passed.
    ``padding_mask=False`` (train.padding_mask): a right-padded batch from the loader attends causally only, which
    gives every real token the same hidden state; the padded positions' differ."""
    model = unwrap_vlm(vlm).model
    kwargs = vlm_inputs(vlm, inputs)
    if "image_token_index" in inputs and "pixel_values" in kwargs:
        kwargs = with_image_features(model, kwargs, inputs["image_token_index"])
        if "has_padding" in inputs and isinstance(kwargs.get("attention_mask"), torch.Tensor):
            mask_padding = inputs["has_padding"] and padding_mask
            kwargs["attention_mask"] = text_masks(model.language_model, kwargs, mask_padding)
    return model(**kwargs, use_cache=False).last_hidden_state


def text_masks(language_model: nn.Module, kwargs: dict[str, Any], mask_padding: bool) -> dict | torch.Tensor:
    """The language model's attention masks of a right-padded batch, as transformers builds them, without its
    check of the padding mask on the GPU (which reads it back): ``mask_padding`` where the loader found a padded
    row (``has_padding``) and train.padding_mask keeps it masked. Otherwise the causal mask alone, which is none
    (sdpa's ``is_causal``), as transformers makes it. Models with other layer types than full attention keep the
    2-D mask and transformers' own mask building."""
    from transformers.masking_utils import create_causal_mask

    if set(language_model.config.layer_types) != {"full_attention"}:
        return kwargs["attention_mask"]
    mask = create_causal_mask(config=language_model.config, inputs_embeds=kwargs["inputs_embeds"],
                              attention_mask=kwargs["attention_mask"], past_key_values=None, position_ids=None,
                              allow_is_causal_skip=False) if mask_padding else None
    return {"full_attention": mask}


def with_image_features(model: nn.Module, kwargs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """``kwargs`` of a Qwen2.5-VL base model's forward with input_ids and pixel_values replaced by inputs_embeds:
    the token embeddings with the vision tower's features written at the image tokens (``index``: their flat
    positions, trainer.host_inputs.image_token_index). transformers' forward writes the same values with
    ``masked_scatter``, after reading the number of image tokens and the features' split sizes back from the GPU
    (and the scatter's backward reads the mask's count again); the loader checked that number."""
    kwargs = dict(kwargs)
    embeds = model.get_input_embeddings()(kwargs.pop("input_ids"))
    vision = {k.removeprefix("image_"): kwargs.pop(k) for k in VISION_INPUTS if k in kwargs}
    visual = model.visual
    features = visual(kwargs.pop("pixel_values").type(visual.dtype), grid_thw=kwargs["image_grid_thw"],
                      **vision).pooler_output
    flat = embeds.reshape(-1, embeds.shape[-1])
    flat = flat.index_copy(0, index.to(flat.device), features.to(flat.device, flat.dtype))
    kwargs["inputs_embeds"] = flat.view_as(embeds)
    return kwargs


def vlm_inputs(vlm: nn.Module, batch: dict[str, Any], labels: bool = False) -> dict[str, Any]:
    """The keyword arguments of the VLM's forward for a :func:`trainer.batch.build_batch` batch, with what the
    loader computed for it (trainer.host_inputs). A packed batch (train.packing) goes without attention_mask:
    transformers reads the sample boundaries from its positions (its own packed-sequence support)."""
    inputs = {k: batch[k] for k in VLM_INPUTS if k in batch and (labels or k != "labels")}
    if "packed" in batch:
        del inputs["attention_mask"]
        language_model = unwrap_vlm(vlm).model.language_model
        if getattr(language_model, PACKED_ROWS_NEED_NO_MASK, False):
            # the attention reads the loader's sample boundaries: no mask is built (transformers' builder would
            # read the packed positions back from the GPU to find them)
            inputs["attention_mask"] = dict.fromkeys(set(language_model.config.layer_types))
    return inputs


def labelled_text_loss(hidden: torch.Tensor, text: dict[str, torch.Tensor], lm_head: nn.Module) -> torch.Tensor:
    """Sum over samples of each sample's mean next-token cross-entropy, from logits at labelled positions only.

    Only the answer tokens carry labels, so the ``(B, T, vocab)`` logits of a full forward pass (152k columns
    for Qwen2.5-VL, about 1.8 GB in fp32 for 8 samples of 365 tokens) are never made: lm_head runs on the
    hidden states that predict a labelled token. ``text`` is :func:`trainer.batch.text_targets`.
    """
    device = hidden.device
    rows, positions = text["rows"].to(device), text["positions"].to(device)
    logits = lm_head(hidden[rows, positions])
    token_losses = F.cross_entropy(logits.float(), text["targets"].to(device), reduction="none")
    return (token_losses * text["weights"].to(device)).sum()


def repeated_blocks(vlm: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers, then the vision tower's blocks."""
    model = unwrap_vlm(vlm).model
    return [*model.language_model.layers, *model.visual.blocks]


# Every decoder layer and vision block runs one code object (transformers' GradientCheckpointingLayer.__call__),
# and so does each resume function after a graph break in them: their variants (text and vision blocks, training
# and evaluation, grad modes, the first layer's input that needs no grad, static then dynamic shapes, padded and
# packed rows) count against one recompile limit per code object, 8 by default, past which each new variant runs
# eagerly with only a warning. Measured: the 7B-sized bench step on an H100 ran every block eagerly; the tiny
# model's bench run (padded and packed rows, the exactness check in evaluation mode) makes 10 variants of that
# code object, 7 once every block holds its own gradient_checkpointing flag, as many at 6 layers as at 2.
BLOCK_RECOMPILE_LIMIT = 64

# torch.compile modes that replay the compiled code as CUDA graphs (inductor's CUDA graph trees)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_blocks(vlm: nn.Module, mode: str | None = None) -> list[nn.Module]:
    """torch.compile each decoder layer of the language model and each block of the vision tower, in place
    (train.compile; regional compilation): the repeated blocks share their compiled code, the state dict keeps
    its keys, and what runs between the blocks (embeddings, rope index, the heads) stays eager. Compiles lazily,
    at each new shape of the first calls. The compiled code of earlier models is dropped first
    (``torch.compiler.reset``): a process that trains run after run keeps only the current model's, and dynamo's
    recompile limit is raised to ``BLOCK_RECOMPILE_LIMIT`` so that every variant of the blocks compiles. ``mode``
    is torch.compile's; in :data:`CUDA_GRAPH_MODES` one compiled :func:`class_forward` becomes each block's forward
    method, its output handed off outside the graph (:class:`BlockHandOff`), and the step keeps its gradients
    (:func:`keep_gradients`). Returns the blocks."""
    torch.compiler.reset()
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    blocks = repeated_blocks(vlm)
    graphed = handed_off(torch.compile(class_forward, mode=mode)) if mode in CUDA_GRAPH_MODES else None
    for block in blocks:
        # an attribute in some blocks' own dict and only on others' class is a guard that tells them apart
        block.gradient_checkpointing = getattr(block, "gradient_checkpointing", False)
        if graphed is not None:
            block.forward = types.MethodType(graphed, block)  # a bound method: a deep copy binds it to the copy
        else:
            block.compile(mode=mode)
    return blocks


class BlockHandOff(torch.autograd.Function):
    """The identity, as a copy both ways: a block's output leaves its CUDA graph's memory before the next block
    reads it, and so does the gradient that the next block's backward hands back. The blocks replay one compiled
    graph, and torch 2.11's CUDA graph trees overwrite a replay's outputs at the next replay while they are still
    needed ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run",
    pytorch/pytorch#152887); the copy, of one hidden state per block, is what the error message prescribes."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


def class_forward(block: nn.Module, *args, **kwargs):
    """``block``'s own class's forward: what the CUDA graph modes compile, once for every block."""
    return type(block).forward(block, *args, **kwargs)


def handed_off(compiled):
    """A forward for :func:`types.MethodType`: ``compiled`` (:func:`class_forward` compiled) of the block, its
    output passed through :class:`BlockHandOff` outside the graph."""
    def forward(block: nn.Module, *args, **kwargs):
        return BlockHandOff.apply(compiled(block, *args, **kwargs))  # transformers' blocks return the hidden state
    return forward


def keep_gradients(params: list[nn.Parameter]) -> None:
    """Give each parameter a zero ``.grad`` it keeps, for steps with CUDA graphs (then clear with
    ``zero_grad(set_to_none=False)``): the backward adds into it in place instead of keeping the graph's output
    tensor as the gradient, which the next micro-batch's replay would overwrite before the optimizer reads it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
