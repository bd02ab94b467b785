"""The CoVT model: transformers' Qwen2.5-VL plus one head per anchor, by composition.

``CoVTModel.forward(batch, anchor_losses)`` runs the VLM on a :func:`trainer.batch.build_batch`
batch with labels (the text loss), reads the last-layer hidden states (the output of the
language model's final norm, the states the lm_head reads), gathers each anchor's pad
positions into ``(B_a, tokens, hidden)`` "visual thoughts" and, when anchor losses are on,
scores them with that anchor's head against the cached targets.

The loss is the reference's: text cross-entropy + the sum of the anchor losses (each head
already carries the reference's own scale, e.g. depth x 0.005, dino x 0.5); with anchor
losses off, the text loss alone. ``train.loss_weights`` is an optional extra multiplier
per anchor (default 1, the reference).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from trainer.batch import batch_to
from trainer.tokens import ThoughtTokens

VLM_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def unwrap_vlm(vlm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``vlm`` itself)."""
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


def text_config(vlm: nn.Module):
    config = unwrap_vlm(vlm).config
    return getattr(config, "text_config", config)


def text_hidden_size(vlm: nn.Module) -> int:
    return int(text_config(vlm).hidden_size)


def final_norm(vlm: nn.Module) -> nn.Module:
    """The language model's final norm, whose output is the last-layer hidden state."""
    base = unwrap_vlm(vlm)
    language_model = getattr(getattr(base, "model", base), "language_model", None)
    norm = getattr(language_model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"{type(base).__name__}: no model.language_model.norm; expected a Qwen2.5-VL model")
    return norm


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects ``module``'s forward outputs while the context is open.

    A hook rather than ``output_hidden_states``: it does not keep every layer's states,
    and it survives peft wrapping, gradient checkpointing and a VLM swapped by a LoRA
    merge (it is attached per forward, to whatever ``.vlm`` is at that moment).
    """
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield outputs
    finally:
        handle.remove()


def gather_thoughts(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[rows[i], positions[i, j]]`` as ``(len(rows), positions.shape[1], hidden)``."""
    rows = rows.to(hidden.device)
    positions = positions.to(hidden.device)
    return hidden[rows[:, None], positions]


class CoVTModel(nn.Module):
    def __init__(self, vlm: nn.Module, heads: nn.ModuleDict, tokens: ThoughtTokens,
                 loss_weights: dict[str, float] | None = None):
        super().__init__()
        self.vlm = vlm
        self.heads = heads
        self.tokens = tokens
        self.loss_weights = dict(loss_weights or {})
        unknown = sorted(set(self.loss_weights) - set(heads.keys()))
        if unknown:
            raise KeyError(f"train.loss_weights names anchors without a head: {unknown} (heads: {list(heads.keys())})")
        hidden = text_hidden_size(vlm)
        for name, head in heads.items():
            if getattr(head, "hidden_size", hidden) != hidden:
                raise ValueError(f"head {name!r} expects hidden size {head.hidden_size}, the VLM has {hidden}")

    def view_sizes(self) -> dict[str, int | None]:
        """anchor -> side of the uint8 views its head wants (for build_batch)."""
        return {name: getattr(head, "view_size", None) for name, head in self.heads.items()}

    def forward(self, batch: dict[str, Any], anchor_losses: bool = True) -> dict[str, Any]:
        inputs = {k: batch[k] for k in VLM_INPUTS if k in batch}
        with capture_output(final_norm(self.vlm)) as captured:
            out = self.vlm(**inputs, use_cache=False)
        if not captured:
            raise RuntimeError("the language model's final norm did not run; cannot read the visual thoughts")
        hidden = captured[0]
        text_loss = out.loss
        total = text_loss
        parts: dict[str, torch.Tensor] = {"text": text_loss.detach()}
        if anchor_losses:
            for anchor, part in batch.get("anchors", {}).items():
                if anchor not in self.heads:
                    raise KeyError(f"batch carries anchor {anchor!r} but there is no head for it "
                                   f"(heads: {list(self.heads.keys())})")
                head = self.heads[anchor]
                thoughts = gather_thoughts(hidden, part["rows"], part["positions"])
                param = next(head.parameters(), None)
                if param is not None and param.is_floating_point():
                    thoughts = thoughts.to(param.dtype)
                loss = head(thoughts, batch_to(part["targets"], hidden.device),
                            batch_to(part.get("views"), hidden.device))
                total = total + self.loss_weights.get(anchor, 1.0) * loss
                parts[anchor] = loss.detach()
        # one device sync for all the logged numbers
        values = torch.stack([v.float().reshape(()) for v in parts.values()]).tolist()
        return {"loss": total, **dict(zip(parts, values))}
