"""The four CoVT stage formats: a LLaVA conversation -> the exact text the model trains on.

The texts are the reference implementation's, byte for byte (Wakals/CoVT
``train/src/training/data.py``; ``tests/test_reference_formats.py`` checks them against
the golden texts its own functions produce). A sample is one :class:`TrainingText`:
``prompt`` (no labels) and ``labelled`` (labels on every token). Like the reference,
only the FIRST question/answer pair of a conversation is used; later turns are dropped.

    prompt   = <|im_start|>system\\nYou are a helpful assistant.\\n<|im_end|>\\n
               <|im_start|>user\\n{question}\\n<|im_end|>\\n<|im_start|>assistant\\n
    labelled = {answer}\\n<|im_end|>\\n

(note the newline before each ``<|im_end|>``: the reference's own layout, not Qwen's chat
template). ``<image>`` and the newlines around it become ``IMAGE_TEXT`` where it stands
(the processor expands ``<|image_pad|>`` to the image's patches). ``thoughts(anchors)``
is each anchor's ``<|anchor_start|>`` + N x ``<|a_pad|>`` + ``<|anchor_end|>``, in order.

1. understanding: the thoughts right after the image in the question; answer unchanged.
2. generation: the question becomes IMAGE_TEXT + "What is the {names joined by ', '} of
   the image?" and the answer is the thoughts.
3. reasoning: the answer becomes ``<think> Because the {name} of the image is {pads}, ...,
   and the {name} of the image is {pads}.  </think>\\n<answer> {answer} </answer>``.
4. efficient_reasoning: like 3 over a random non-empty subset of the anchors (uniform
   size, then uniform subset, kept in config order), or with probability
   ``PLAIN_ANSWER_FRACTION`` (the reference's 1 in 6) the plain answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from covt.anchors import get_anchor
from covt.config import PLAIN_ANSWER_FRACTION, STAGE_NAMES
from trainer.tokens import thought_text

SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's
IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen2.5-VL's, before the processor expands it
_IMAGE_AND_NEWLINES = re.compile(r"\n?" + re.escape(IMAGE_PLACEHOLDER) + r"\n?")
_SPEAKERS = {"human": "user", "gpt": "assistant"}


class FormatError(ValueError):
    """A conversation that cannot be put into a stage format."""


@dataclass(frozen=True)
class TrainingText:
    prompt: str  # system turn + user turn + assistant header: no labels
    labelled: str  # the assistant's answer + "\n<|im_end|>\n": every token labelled


def thoughts(anchors: list[str]) -> str:
    return "".join(thought_text(a) for a in anchors)


def thought_names(anchors: list[str]) -> list[str]:
    return [get_anchor(a).thought_name for a in anchors]


def turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}\n{IM_END}\n"


SYSTEM_TURN = turn("system", SYSTEM_MESSAGE)
ASSISTANT_HEADER = f"{IM_START}assistant\n"


def generation_question(anchors: list[str]) -> str:
    return f"{IMAGE_TEXT}What is the {', '.join(thought_names(anchors))} of the image?"


def reasoning_answer(answer: str, anchors: list[str]) -> str:
    """Stage 3's answer: the chain over ``anchors``, then the answer (spacing exactly the reference's)."""
    clauses = [f"the {name} of the image is {thought_text(a)}" for a, name in zip(anchors, thought_names(anchors))]
    chain = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + ", and " + clauses[-1]
    return f"<think> Because {chain}.  </think>\n<answer> {answer} </answer>"


def first_pair(conversations: list[dict]) -> tuple[str, str]:
    """(question with the image in place, answer) of the first exchange; the rest is checked, then dropped."""
    if not conversations:
        raise FormatError("empty conversation")
    texts = []
    for i, entry in enumerate(conversations):
        role = _SPEAKERS.get(entry.get("from"))
        if role is None:
            raise FormatError(f"turn {i}: unknown speaker {entry.get('from')!r} (expected 'human' or 'gpt')")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise FormatError(f"turn {i}: expected a {expected} turn, got {role}")
        text = str(entry.get("value", ""))
        if i > 0 and IMAGE_PLACEHOLDER in text:
            raise FormatError(f"turn {i}: {IMAGE_PLACEHOLDER} outside the first turn (one image per sample)")
        texts.append(text)
    if len(texts) < 2:
        raise FormatError("conversation has no answer")
    question, answer = texts[0], texts[1]
    if question.count(IMAGE_PLACEHOLDER) != 1:
        raise FormatError(f"first turn has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders "
                          "(exactly one image per sample)")
    if not answer.strip():
        raise FormatError("turn 1: empty answer")
    return _IMAGE_AND_NEWLINES.sub(IMAGE_TEXT, question), answer


def stage_text(stage: str, question: str, answer: str, anchors: list[str]) -> TrainingText:
    """``stage``'s text of one exchange over ``anchors``; for efficient_reasoning ``anchors`` is the drawn
    subset and [] means the plain answer."""
    if stage not in STAGE_NAMES:
        raise FormatError(f"unknown stage {stage!r} (known: {list(STAGE_NAMES)})")
    plain = TrainingText(SYSTEM_TURN + turn("user", question) + ASSISTANT_HEADER, f"{answer}\n{IM_END}\n")
    if stage == "understanding":
        with_thoughts = question.replace(IMAGE_TEXT, IMAGE_TEXT + thoughts(anchors))
        return TrainingText(SYSTEM_TURN + turn("user", with_thoughts) + ASSISTANT_HEADER, plain.labelled)
    if stage == "generation":
        return TrainingText(SYSTEM_TURN + turn("user", generation_question(anchors)) + ASSISTANT_HEADER,
                            f"{thoughts(anchors)}\n{IM_END}\n")
    if stage == "efficient_reasoning" and not anchors:
        return plain
    return TrainingText(plain.prompt, f"{reasoning_answer(answer, anchors)}\n{IM_END}\n")


def choose_efficient(anchors: list[str], rng: np.random.Generator,
                     plain_answer_fraction: float = PLAIN_ANSWER_FRACTION) -> list[str]:
    """Stage 4's draw: [] for a plain answer, else a subset of uniform size 1..n, uniform among that size,
    kept in ``anchors`` order (the reference's ``randint(0, 5) == 0``, ``randint(1, n)``, ``sample``)."""
    if rng.random() < plain_answer_fraction:
        return []
    size = int(rng.integers(1, len(anchors) + 1))
    chosen = set(rng.choice(len(anchors), size=size, replace=False).tolist())
    return [a for i, a in enumerate(anchors) if i in chosen]


def format_sample(conversations: list[dict], stage: str, anchors: list[str], rng: np.random.Generator | None = None,
                  plain_answer_fraction: float = PLAIN_ANSWER_FRACTION) -> TrainingText:
    """The training text of one LLaVA conversation in ``stage``'s format with the active ``anchors``."""
    if not anchors:
        raise FormatError("no active anchors")
    question, answer = first_pair(conversations)
    if stage == "efficient_reasoning":
        if rng is None:
            raise FormatError("efficient_reasoning needs an rng")
        anchors = choose_efficient(anchors, rng, plain_answer_fraction)
    return stage_text(stage, question, answer, anchors)


def plain_text(conversations: list[dict]) -> TrainingText:
    """The first exchange without visual thoughts (stage 4's plain answer; the baseline of benchmarks)."""
    question, answer = first_pair(conversations)
    return stage_text("efficient_reasoning", question, answer, [])


def sample_rng(seed: int, step: int, index: int | None) -> np.random.Generator:
    """The format randomness of one sample: a function of (train seed, global step, sample index) only;
    index None: of the step alone, shared by its samples (train.stage4_draws: per_step)."""
    return np.random.default_rng([int(seed), int(step)] + ([] if index is None else [int(index)]))
