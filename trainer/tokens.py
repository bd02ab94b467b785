"""The tokens CoVT adds: the visual thought tokens and the reasoning tags.

A visual thought of anchor ``a`` is written ``<|anchor_start|>`` + N x ``<|a_pad|>`` +
``<|anchor_end|>`` with N = ``ANCHORS[a].tokens``; these are added to the tokenizer as
special tokens (never split, decodable). ``<think>``, ``</think>``, ``<answer>`` and
``</answer>`` are added as ordinary added tokens, as the reference does, so that
``decode(..., skip_special_tokens=True)`` keeps them and answers can be parsed. The VLM's
input embedding and lm_head are grown to cover them when needed, and the new rows start
at the mean of the existing vocabulary's rows (plus tiny seeded noise, so pads of
different anchors are distinguishable from step 0). Only these rows train.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from covt.anchors import ANCHORS, get_anchor

ANCHOR_START = "<|anchor_start|>"
ANCHOR_END = "<|anchor_end|>"
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # stages 3-4 (trainer.formats)


def pad_token(anchor: str) -> str:
    return f"<|{anchor}_pad|>"


def thought_token_strings() -> list[str]:
    """Every thought token, in a fixed order (start, end, then one pad per registry anchor)."""
    return [ANCHOR_START, ANCHOR_END] + [pad_token(a) for a in ANCHORS]


def added_token_strings() -> list[str]:
    """Every token CoVT adds, in a fixed order: the thought tokens, then the reasoning tags."""
    return thought_token_strings() + list(REASONING_TAGS)


def thought_text(anchor: str) -> str:
    """The pads of one anchor as text: start + N pads + end."""
    return ANCHOR_START + pad_token(anchor) * get_anchor(anchor).tokens + ANCHOR_END


@dataclass(frozen=True)
class ThoughtTokens:
    start_id: int
    end_id: int
    pad_id: dict[str, int]  # anchor -> id of <|anchor_pad|>
    tag_ids: tuple[int, ...] = ()  # ids of REASONING_TAGS, in that order

    @property
    def ids(self) -> list[int]:
        """Every added token's id: the rows of the embedding and lm_head that train."""
        return [self.start_id, self.end_id] + list(self.pad_id.values()) + list(self.tag_ids)

    @cached_property
    def anchor_of(self) -> dict[int, str]:
        """pad id -> its anchor."""
        return {token_id: anchor for anchor, token_id in self.pad_id.items()}


# ----------------------------------------------------------------------------- the grammar of a visual thought
def spans(ids: list[int], open_id: int, close_id: int) -> list[tuple[int, int]]:
    """(position of ``open_id``, position of the ``close_id`` that closes it) for each closed span in ``ids``."""
    found, begin = [], None
    for i, token_id in enumerate(ids):
        if token_id == open_id:
            begin = i
        elif token_id == close_id and begin is not None:
            found.append((begin, i))
            begin = None
    return found


def thought_positions(ids: list[int], tokens: ThoughtTokens, offset: int = 0) -> list[tuple[str, list[int]]]:
    """(anchor, positions of its pads) for each complete visual thought in ``ids`` (positions + ``offset``):
    the pads of one anchor only, as many as its token count."""
    complete = []
    for begin, end in spans(ids, tokens.start_id, tokens.end_id):
        names = {tokens.anchor_of.get(t) for t in ids[begin + 1:end]}
        if len(names) == 1 and None not in names:
            anchor = names.pop()
            if end - begin - 1 == ANCHORS[anchor].tokens:
                complete.append((anchor, [offset + j for j in range(begin + 1, end)]))
    return complete


# one visual thought as decoded text: start, pads, end
THOUGHT_SPAN = re.compile(re.escape(ANCHOR_START) + r"((?:<\|\w+_pad\|>)*)" + re.escape(ANCHOR_END))
PAD_NAME = re.compile(r"<\|(\w+)_pad\|>")


def thought_chain(text: str) -> tuple[str, list[str]]:
    """``text`` (decoded with special tokens) with each visual thought as ``[anchor x N]``, and the anchors of the
    complete ones (one anchor, its full token count), in order."""
    anchors: list[str] = []

    def show(match: re.Match) -> str:
        pads = PAD_NAME.findall(match.group(1))
        names = sorted(set(pads))
        name = names[0] if len(names) == 1 else "+".join(names) or "empty"
        if len(names) == 1 and len(pads) == ANCHORS[names[0]].tokens:
            anchors.append(names[0])
        return f"[{name} x{len(pads)}]"

    shown = THOUGHT_SPAN.sub(show, text)
    return re.sub(r"<\|(im_end|endoftext)\|>", "", shown).strip(), anchors


def thought_tokens(tokenizer) -> ThoughtTokens:
    """Ids of the added tokens in a tokenizer that already has them (e.g. a trained CoVT folder)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in added_token_strings() if t not in vocab]
    if missing:
        raise KeyError(f"tokenizer lacks the CoVT tokens {missing}; call add_thought_tokens first")
    return ThoughtTokens(
        start_id=vocab[ANCHOR_START],
        end_id=vocab[ANCHOR_END],
        pad_id={a: vocab[pad_token(a)] for a in ANCHORS},
        tag_ids=tuple(vocab[t] for t in REASONING_TAGS),
    )


def add_thought_tokens(processor, model=None, seed: int = 0) -> ThoughtTokens:
    """Add the thought tokens and reasoning tags to ``processor.tokenizer`` and make room for them in ``model``.

    Idempotent: tokens already in the tokenizer (a folder saved after stage 1) keep their
    ids and their trained embedding rows; only rows of tokens added by this call are
    initialised.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    new = [t for t in added_token_strings() if t not in vocab]
    special = [t for t in new if t not in REASONING_TAGS]
    if special:
        tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    if len(special) < len(new):
        tokenizer.add_tokens([t for t in new if t in REASONING_TAGS])
    tokens = thought_tokens(tokenizer)
    if model is not None:
        new_ids = [tokenizer.convert_tokens_to_ids(t) for t in new]
        _grow_embeddings(model, len(tokenizer), new_ids, seed)
    return tokens


@torch.no_grad()
def _grow_embeddings(model, tokenizer_len: int, new_ids: list[int], seed: int) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer_len > rows:
        # Real checkpoints have spare rows past the tokenizer (Qwen2.5-VL-7B: 152064 for
        # 151665 tokens); only grow when the new ids do not fit.
        model.resize_token_embeddings(tokenizer_len, mean_resizing=False)
    if not new_ids:
        return
    known = min(new_ids)  # rows below the first new id belong to the original vocabulary
    generator = torch.Generator().manual_seed(seed)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        old = weight[:known].float()
        mean, std = old.mean(0), old.std(0).mean()
        noise = torch.randn(len(new_ids), weight.shape[1], generator=generator) * (1e-3 * std)
        idx = torch.tensor(new_ids, device=weight.device)
        weight[idx] = (mean.cpu() + noise).to(weight.dtype).to(weight.device)
