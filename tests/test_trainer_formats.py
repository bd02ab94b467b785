"""The four stage formats, label masking, per-anchor pad positions and truncation of build_batch."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from covt.anchors import ANCHORS
from covt.config import Config, ModelConfig, StageConfig, TrainConfig
from covt.images import square_view
from shards.reader import Cache
from trainer.batch import IGNORE_INDEX, BatchError, build_batch, sample_text
from trainer.formats import FormatError, choose_efficient, first_pair, format_sample, plain_text, sample_rng, stage_text
from trainer.settings import BatchSettings
from trainer.tiny_model import build_tiny_base_model
from trainer.tokens import add_thought_tokens

ANCHORS_2 = ["sam", "depth"]
QUESTION = "What is the person in the image wearing?"
ANSWER = "The person is wearing a white spacesuit with patches on the chest and shoulder."
QUESTION_2 = "What is behind the person?"
ANSWER_2 = "An American flag and a model of a spacecraft are behind the person."
CONVERSATION = [
    {"from": "human", "value": "<image>\n" + QUESTION},
    {"from": "gpt", "value": ANSWER},
    {"from": "human", "value": QUESTION_2},
    {"from": "gpt", "value": ANSWER_2},
]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def pads(anchor):
    return "<|anchor_start|>" + f"<|{anchor}_pad|>" * ANCHORS[anchor].tokens + "<|anchor_end|>"


def user(text):
    return f"<|im_start|>user\n{text}\n<|im_end|>\n<|im_start|>assistant\n"


def answer(text):
    return f"{text}\n<|im_end|>\n"


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = build_tiny_base_model(tmp_path_factory.mktemp("formats") / "base", seed=0, image_size=112)
    proc = AutoProcessor.from_pretrained(folder)
    return proc, add_thought_tokens(proc)


@pytest.fixture(scope="module")
def samples(synthetic_cache):
    cache = Cache(synthetic_cache)
    by_id = {}
    for i in range(len(cache)):
        s = cache.sample(i)
        by_id[s["id"]] = s
    return by_id


def config(anchors=ANCHORS_2, max_length=2048, plain=1 / 6, seed=0) -> BatchSettings:
    return BatchSettings.from_config(Config(anchors=list(anchors), model=ModelConfig(image_size=112),
                                            train=TrainConfig(max_length=max_length, plain_answer_fraction=plain,
                                                              seed=seed)))


def astronaut(samples):
    s = copy.copy(samples["astronaut"])
    assert s["conversations"] == CONVERSATION  # the bundled record this file's expected strings are written for
    return s


# ------------------------------------------------------ texts (every stage exactly: test_reference_formats.py)
def test_understanding_puts_the_thoughts_right_after_the_image_and_keeps_only_the_first_exchange(samples):
    text = sample_text(astronaut(samples), "understanding", ANCHORS_2, 0, config())
    assert text.prompt == SYSTEM + user(IMAGE + pads("sam") + pads("depth") + QUESTION)
    assert text.labelled == answer(ANSWER)


def test_generation_joins_the_names_with_commas_and_answers_with_the_pads():
    text = format_sample(CONVERSATION, "generation", ["sam", "depth", "dino"])
    assert text.prompt == SYSTEM + user(IMAGE + "What is the segmentation, depth map, perception feature of the image?")
    assert text.labelled == answer(pads("sam") + pads("depth") + pads("dino"))


def test_reasoning_wraps_the_first_answer_in_think_and_answer():
    text = format_sample(CONVERSATION, "reasoning", ANCHORS_2)
    assert text.prompt == SYSTEM + user(IMAGE + QUESTION)
    assert text.labelled == answer(f"<think> Because the segmentation of the image is {pads('sam')}, and the depth "
                                   f"map of the image is {pads('depth')}.  </think>\n<answer> {ANSWER} </answer>")


def test_efficient_reasoning_is_reasoning_over_the_chosen_subset_or_the_plain_answer():
    seen_plain = seen_subset = False
    for step in range(40):
        chosen = choose_efficient(ANCHORS_2, sample_rng(0, step, 3), 0.3)
        text = format_sample(CONVERSATION, "efficient_reasoning", ANCHORS_2, sample_rng(0, step, 3), 0.3)
        assert text == stage_text("efficient_reasoning", *first_pair(CONVERSATION), chosen)
        if chosen:
            seen_subset = True
            assert text == format_sample(CONVERSATION, "reasoning", chosen)
        else:
            seen_plain = True
            assert text == plain_text(CONVERSATION) and text.labelled == answer(ANSWER)
    assert seen_plain and seen_subset


def test_efficient_subset_is_non_empty_and_reproducible_for_the_same_seed_step_and_index():
    anchors = list(ANCHORS)
    draws = {}
    for seed in (0, 1):
        for step in range(30):
            for index in range(10):
                a = choose_efficient(anchors, sample_rng(seed, step, index), 0.0)
                assert a and set(a) <= set(anchors) and a == [x for x in anchors if x in a]
                assert a == choose_efficient(anchors, sample_rng(seed, step, index), 0.0)
                draws[(seed, step, index)] = tuple(a)
    assert len(set(draws.values())) > 20  # it really varies with (seed, step, index)
    assert any(draws[(0, s, i)] != draws[(1, s, i)] for s in range(30) for i in range(10))


def test_plain_answer_fraction_is_respected_on_average():
    plain = [not choose_efficient(ANCHORS_2, sample_rng(0, step, 0), 0.3) for step in range(2000)]
    assert 0.25 < np.mean(plain) < 0.35
    assert TrainConfig().plain_answer_fraction == pytest.approx(1 / 6)  # the reference's default


def test_image_placeholder_in_a_later_turn_missing_or_twice_or_wrong_role_order_is_a_format_error():
    bad = copy.deepcopy(CONVERSATION)
    bad[2]["value"] = "<image>\n" + QUESTION_2
    with pytest.raises(FormatError, match="turn 2"):
        format_sample(bad, "understanding", ANCHORS_2)
    with pytest.raises(FormatError, match="turn 1: expected a assistant turn"):
        format_sample([CONVERSATION[0], CONVERSATION[0]], "understanding", ANCHORS_2)
    for question in (QUESTION, "<image><image>" + QUESTION):
        with pytest.raises(FormatError, match="exactly one image"):
            format_sample([{"from": "human", "value": question}, CONVERSATION[1]], "understanding", ANCHORS_2)


def test_the_image_takes_the_place_of_the_placeholder_and_its_newlines():
    conversation = [{"from": "human", "value": "Look:\n<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    text = format_sample(conversation, "understanding", ["depth"])
    assert text.prompt == SYSTEM + user("Look:" + IMAGE + pads("depth") + "What is it?")


def test_a_bad_conversation_error_names_the_sample(samples, processor):
    proc, tokens = processor
    s = astronaut(samples)
    s["conversations"] = [CONVERSATION[0]]
    with pytest.raises(BatchError, match=r"key 'astronaut'|id 'astronaut'"):
        build_batch([s], StageConfig("understanding", 1), True, 0, proc, tokens, config())


# -------------------------------------------------------------------------- labels and pads
@pytest.mark.parametrize("stage", ["understanding", "generation", "reasoning", "efficient_reasoning"])
def test_only_the_labelled_part_is_supervised_and_the_prompt_is_the_text_with_the_image_expanded(
        samples, processor, stage):
    proc, tokens = processor
    cfg = config()
    batch_samples = [samples["astronaut"], samples["coffee"], samples["chelsea"]]
    batch = build_batch(batch_samples, StageConfig(stage, 1), True, 7, proc, tokens, cfg)
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, s in enumerate(batch_samples):
        text = sample_text(s, stage, list(cfg.anchors), 7, cfg)
        labels, ids = batch["labels"][row], batch["input_ids"][row][batch["attention_mask"][row] == 1]
        supervised = labels[labels != IGNORE_INDEX]
        assert proc.tokenizer.decode(supervised) == text.labelled
        prompt = ids[:ids.numel() - supervised.numel()].tolist()
        first = prompt.index(image_pad)
        prompt = prompt[:first + 1] + [t for t in prompt[first + 1:] if t != image_pad]  # one pad per image
        assert proc.tokenizer.decode(prompt) == text.prompt
        # labels are the input ids themselves where supervised (the VLM shifts them)
        mask = labels != IGNORE_INDEX
        assert torch.equal(labels[mask], batch["input_ids"][row][mask])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("stage", ["understanding", "generation", "reasoning", "efficient_reasoning"])
def test_each_anchor_has_its_registry_count_of_pads_at_the_recorded_positions(samples, processor, stage):
    proc, tokens = processor
    cfg = config(anchors=list(ANCHORS))
    batch_samples = [samples[k] for k in ("astronaut", "coffee", "rocket")]
    batch = build_batch(batch_samples, StageConfig(stage, 1), True, 2, proc, tokens, cfg)
    assert set(batch["anchors"]) == set(ANCHORS)
    for anchor, part in batch["anchors"].items():
        n = ANCHORS[anchor].tokens
        assert part["positions"].shape == (len(part["rows"]), n)
        for r, pos in zip(part["rows"].tolist(), part["positions"]):
            ids = batch["input_ids"][r]
            assert (ids[pos] == tokens.pad_id[anchor]).all()
            assert ids[pos[0] - 1] == tokens.start_id and ids[pos[-1] + 1] == tokens.end_id
            assert int((ids == tokens.pad_id[anchor]).sum()) == n
        for name, value in part["targets"].items():
            expected = [batch_samples[r]["targets"][anchor][name] for r in part["rows"].tolist()]
            assert value.shape[0] == len(expected)
            if expected:
                assert torch.equal(value, torch.stack(expected))
        if stage != "efficient_reasoning":
            assert part["rows"].tolist() == [0, 1, 2]


def test_image_tokens_match_the_square_view_grid(samples, processor):
    proc, tokens = processor
    batch = build_batch([samples["coins"]], StageConfig("understanding", 1), True, 0, proc, tokens, config())
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 px / patch 14
    assert int((batch["input_ids"] == image_id).sum()) == 16  # 8x8 patches merged 2x2


def test_views_are_uint8_square_views_at_the_size_a_head_asks_for(samples, processor):
    proc, tokens = processor
    batch_samples = [samples["coins"], samples["page"]]
    batch = build_batch(batch_samples, StageConfig("understanding", 1), True, 0, proc, tokens, config(),
                        view_sizes={"depth": 48})
    views = batch["anchors"]["depth"]["views"]
    assert views.dtype == torch.uint8 and views.shape == (2, 3, 48, 48)
    assert np.array_equal(views[1].permute(1, 2, 0).numpy(), square_view(batch_samples[1]["images"][0], 48))
    assert batch["anchors"]["sam"]["views"] is None


def test_with_anchor_losses_off_the_batch_has_text_only(samples, processor):
    proc, tokens = processor
    batch = build_batch([samples["coins"]], StageConfig("reasoning", 1), False, 0, proc, tokens, config())
    assert batch["anchors"] == {}
    assert (batch["input_ids"] == tokens.pad_id["sam"]).any()  # the thoughts are still in the text


# ------------------------------------------------------------------------------- truncation
def lengths(samples, processor, stage, anchors):
    proc, tokens = processor
    batch = build_batch([samples["astronaut"]], StageConfig(stage, 1), True, 0, proc, tokens, config(anchors))
    ids = batch["input_ids"][0]
    return ids, tokens


def test_truncation_never_keeps_half_a_thought(samples, processor):
    proc, _ = processor
    ids, tokens = lengths(samples, processor, "reasoning", ANCHORS_2)
    depth_start = (ids == tokens.pad_id["depth"]).nonzero()[0].item() - 1
    cut_inside = depth_start + 2
    batch = build_batch([samples["astronaut"]], StageConfig("reasoning", 1), True, 0, proc, tokens,
                        config(ANCHORS_2, max_length=cut_inside))
    assert batch["input_ids"].shape[1] == depth_start
    assert batch["anchors"]["depth"]["rows"].numel() == 0
    assert batch["anchors"]["depth"]["positions"].shape == (0, ANCHORS["depth"].tokens)
    assert batch["anchors"]["depth"]["targets"]["depth"].shape[0] == 0
    assert batch["anchors"]["sam"]["rows"].tolist() == [0]


def test_truncation_keeps_whole_turns_within_max_length(samples, processor):
    proc, _ = processor
    ids, tokens = lengths(samples, processor, "understanding", ANCHORS_2)
    batch = build_batch([samples["astronaut"]], StageConfig("understanding", 1), True, 0, proc, tokens,
                        config(ANCHORS_2, max_length=len(ids) - 5))
    assert torch.equal(batch["input_ids"][0], ids[:len(ids) - 5])


def test_max_length_inside_the_image_is_a_clear_error(samples, processor):
    proc, tokens = processor
    with pytest.raises(BatchError, match=r"max_length=24 would cut through the image.*astronaut|astronaut.*"
                                         r"max_length=24 would cut through the image"):
        build_batch([samples["astronaut"]], StageConfig("understanding", 1), True, 0, proc, tokens,
                    config(ANCHORS_2, max_length=24))


def test_max_length_that_leaves_no_answer_is_a_clear_error(samples, processor):
    proc, _ = processor
    ids, tokens = lengths(samples, processor, "generation", ANCHORS_2)
    answer_start = (ids == tokens.start_id).nonzero()[0].item()
    with pytest.raises(BatchError, match="leaves no answer token"):
        build_batch([samples["astronaut"]], StageConfig("generation", 1), True, 0, proc, tokens,
                    config(ANCHORS_2, max_length=answer_start + 1))


def test_missing_anchor_targets_is_a_clear_error(samples, processor):
    proc, tokens = processor
    s = copy.copy(samples["coins"])
    s["targets"] = {k: v for k, v in s["targets"].items() if k != "depth"}
    with pytest.raises(BatchError, match="no targets for anchor 'depth'"):
        build_batch([s], StageConfig("understanding", 1), True, 0, proc, tokens, config())
