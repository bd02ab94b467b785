"""The training texts equal the reference's, byte for byte.

The golden file (tests/golden/covt_formats/reference_formats_golden.json, made by
make_golden.py from Wakals/CoVT's own data.py functions: tests/golden/README.md) holds 192 cases: for
each conversation, anchor set, stage and stage-4 draw, the prompt (no labels) and the
labelled part. ``COVT_FORMATS_GOLDEN`` points the test at another file of the same schema.
A case's conversation is its ``conversations`` field when the file has one, else the
bundled sample record with its ``id`` (or the generator's extra "multi-turn" record).
"""
import itertools
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer.formats import choose_efficient, first_pair, format_sample, sample_rng, stage_text

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("COVT_FORMATS_GOLDEN")
              or REPO / "tests/golden/covt_formats/reference_formats_golden.json")
MULTI_TURN = {"id": "multi-turn", "image": "x.jpg", "conversations": [  # added by make_golden.py
    {"from": "human", "value": "<image>\nHow many cups are on the table?"},
    {"from": "gpt", "value": "There are two cups."},
    {"from": "human", "value": "What colour is the left one?"},
    {"from": "gpt", "value": "It is red."}]}


def golden_cases() -> list[dict]:
    if not GOLDEN.is_file():
        pytest.skip(f"reference formats golden not found at {GOLDEN} (set COVT_FORMATS_GOLDEN to its path)")
    return json.loads(GOLDEN.read_text())["cases"]


def conversation_of(case: dict) -> list[dict]:
    if "conversations" in case:
        return case["conversations"]
    records = json.loads((REPO / "data/sample/conversations.json").read_text()) + [MULTI_TURN]
    by_id = {r["id"]: r["conversations"] for r in records}
    assert case["id"] in by_id, f"golden case id {case['id']!r} has no conversation in the file or the sample data"
    return by_id[case["id"]]


def our_text(case: dict):
    conversation, anchors, stage = conversation_of(case), case["anchors"], case["stage"]
    if stage != "efficient_reasoning":
        return format_sample(conversation, stage, anchors)
    chosen = [] if case["choice"] == "plain" else [anchors[i] for i in case["choice"]]
    return stage_text(stage, *first_pair(conversation), chosen)


def test_every_golden_text_is_reproduced_exactly():
    cases = golden_cases()
    assert cases, f"{GOLDEN} has no cases"
    wrong = []
    for i, case in enumerate(cases):
        text = our_text(case)
        for part in ("prompt", "labelled"):
            if getattr(text, part) != case[part]:
                wrong.append(f"case {i} ({case['id']}, {case['anchors']}, {case['stage']}, {case['choice']}) "
                             f"{part}:\n  ours      {getattr(text, part)!r}\n  reference {case[part]!r}")
    assert not wrong, f"{len(wrong)} of {2 * len(cases)} parts differ:\n" + "\n".join(wrong[:4])


def test_the_golden_covers_every_stage_and_draw_kind():
    cases = golden_cases()
    assert {c["stage"] for c in cases} == {"understanding", "generation", "reasoning", "efficient_reasoning"}
    assert any(c["choice"] == "plain" for c in cases)
    assert any(isinstance(c["choice"], list) and len(c["choice"]) > 1 for c in cases)


def test_stage_4_draws_as_the_reference_plain_one_in_six_then_uniform_size_then_uniform_subset():
    anchors = ["sam", "depth", "dino"]
    n, draws = len(anchors), 12000
    counts = Counter(tuple(choose_efficient(anchors, sample_rng(0, step, 0))) for step in range(draws))
    # the reference: plain if randint(0, 5) == 0, else size randint(1, n), then sorted(random.sample(range(n), size))
    expected = {(): 1 / 6}
    for size in range(1, n + 1):
        for subset in itertools.combinations(anchors, size):
            expected[subset] = 5 / 6 / n / math.comb(n, size)
    assert set(counts) == set(expected)
    for subset, p in expected.items():
        sd = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[subset] / draws - p) < 5 * sd, (subset, counts[subset] / draws, p)


def test_the_format_of_a_sample_is_a_function_of_seed_step_and_index_only():
    conversation = MULTI_TURN["conversations"]
    a = format_sample(conversation, "efficient_reasoning", ["sam", "depth"], sample_rng(3, 7, 11))
    b = format_sample(conversation, "efficient_reasoning", ["sam", "depth"], sample_rng(3, 7, 11))
    assert a == b
    texts = {format_sample(conversation, "efficient_reasoning", ["sam", "depth"], sample_rng(3, s, 11)).labelled
             for s in range(40)}
    assert len(texts) == 4  # plain, sam, depth, sam+depth
    assert np.all([t.endswith("\n<|im_end|>\n") for t in texts])
