"""The four CoVT stage formats: a LLaVA conversation -> chat messages for the processor.

Pure functions of (conversation, stage, active anchors, rng). ``thoughts(anchors)`` is the
pads of each anchor in order, ``<|anchor_start|>`` + N x ``<|a_pad|>`` + ``<|anchor_end|>``.

1. understanding: the first user turn becomes image, thoughts, question (the LLaVA
   ``<image>\\n`` placeholder is where the image goes); every turn kept, answers unchanged.
2. generation: the conversation is replaced by one exchange, the user asking
   "What is the {names} of the image?" and the answer being the thoughts.
3. reasoning: the FIRST answer becomes
   ``<think> Because the {name} of the image is {pads}, the ... . </think><answer> {answer} </answer>``
   (one clause per anchor); later turns stay as they are (plain question, plain answer),
   so the model keeps multi-turn ability and sees its earlier thoughts in context.
4. efficient_reasoning: like 3 with a random non-empty subset of the anchors, or with
   probability ``plain_answer_fraction`` the first answer left plain (no think/answer tags).

Messages use the Hugging Face chat format: ``{"role": "user", "content": [{"type": "image"},
{"type": "text", "text": ...}]}``; assistant contents are plain strings.
"""
from __future__ import annotations

from typing import get_args, get_type_hints

import numpy as np

from shards.anchors import get_anchor
from shards.config import StageConfig
from trainer.tokens import thought_text

STAGES: tuple[str, ...] = get_args(get_type_hints(StageConfig)["name"])  # the names train.stages accepts, in order
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "gpt": "assistant"}


class FormatError(ValueError):
    """A conversation that cannot be put into a stage format."""


def thoughts(anchors: list[str]) -> str:
    return "".join(thought_text(a) for a in anchors)


def join_names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def generation_question(anchors: list[str]) -> str:
    return f"What is the {join_names([get_anchor(a).thought_name for a in anchors])} of the image?"


def reasoning_answer(answer: str, anchors: list[str]) -> str:
    clauses = ", ".join(f"the {get_anchor(a).thought_name} of the image is {thought_text(a)}" for a in anchors)
    return f"<think> Because {clauses}. </think><answer> {answer} </answer>"


def _turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(role, text) pairs, checked to alternate user/assistant starting with the user."""
    if not conversations:
        raise FormatError("empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise FormatError(f"turn {i}: unknown speaker {turn.get('from')!r} (expected 'human' or 'gpt')")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise FormatError(f"turn {i}: expected a {expected} turn, got {role}")
        text = str(turn.get("value", "")).strip()
        if i > 0 and IMAGE_PLACEHOLDER in text:
            raise FormatError(f"turn {i}: {IMAGE_PLACEHOLDER} outside the first turn (one image per sample)")
        turns.append((role, text))
    if len(turns) < 2:
        raise FormatError("conversation has no answer")
    return turns


def _first_user_content(text: str, inserted: str) -> list[dict]:
    """Image where ``<image>`` was (start if absent), ``inserted`` right after it, then the text."""
    if text.count(IMAGE_PLACEHOLDER) > 1:
        raise FormatError(f"first turn has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders (one image per sample)")
    before, _, after = text.partition(IMAGE_PLACEHOLDER) if IMAGE_PLACEHOLDER in text else ("", "", text)
    content = []
    if before.strip():
        content.append({"type": "text", "text": before.strip() + "\n"})
    content.append({"type": "image"})
    rest = inserted + after.strip()
    if rest:
        content.append({"type": "text", "text": rest})
    return content


def _messages(turns: list[tuple[str, str]], first_user_insert: str = "") -> list[dict]:
    messages = []
    for i, (role, text) in enumerate(turns):
        if i == 0:
            messages.append({"role": "user", "content": _first_user_content(text, first_user_insert)})
        else:
            messages.append({"role": role, "content": text if role == "assistant" else [{"type": "text", "text": text}]})
    return messages


def choose_efficient(anchors: list[str], rng: np.random.Generator, plain_answer_fraction: float) -> list[str]:
    """Stage 4's choice: [] for a plain answer, else a non-empty subset (kept in ``anchors`` order)."""
    if rng.random() < plain_answer_fraction:
        return []
    size = int(rng.integers(1, len(anchors) + 1))
    chosen = set(rng.choice(len(anchors), size=size, replace=False).tolist())
    return [a for i, a in enumerate(anchors) if i in chosen]


def format_conversation(
    conversations: list[dict],
    stage: str,
    anchors: list[str],
    rng: np.random.Generator | None = None,
    plain_answer_fraction: float = 0.0,
) -> list[dict]:
    """Chat messages of one LLaVA conversation in ``stage``'s format with the active ``anchors``."""
    if stage not in STAGES:
        raise FormatError(f"unknown stage {stage!r} (known: {list(STAGES)})")
    if not anchors:
        raise FormatError("no active anchors")
    turns = _turns(conversations)
    if stage == "understanding":
        return _messages(turns, first_user_insert=thoughts(anchors))
    if stage == "generation":
        return _messages([("user", IMAGE_PLACEHOLDER + generation_question(anchors)), ("assistant", thoughts(anchors))])
    if stage == "efficient_reasoning":
        if rng is None:
            raise FormatError("efficient_reasoning needs an rng")
        anchors = choose_efficient(anchors, rng, plain_answer_fraction)
        if not anchors:
            return _messages(turns)
    first_answer = turns[1][1]
    turns = [turns[0], ("assistant", reasoning_answer(first_answer, anchors))] + turns[2:]
    return _messages(turns)


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The format randomness of one sample: a function of (train seed, global step, sample index) only."""
    return np.random.default_rng([int(seed), int(step), int(index)])
