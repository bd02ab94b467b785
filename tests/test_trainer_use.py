"""Using a trained model: generate, evaluate (VLMEvalKit's MCQ layout), the ablation, the thoughts: false control.

The fast tests pin the pieces (answer extraction, option matching, the prompt text, thought spans);
the slow ones run the CLIs on the tiny run conftest.py trains once per session.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covt.config import load_config
from inference.evaluate import ModelResult, markdown_table, match_option, mcq_prompt, read_benchmark
from inference.generate import ThoughtSpanCompleter, extract_answer, read_questions
from trainer.tokens import (
    ANCHOR_END,
    ANCHOR_START,
    ThoughtTokens,
    pad_token,
    thought_chain,
    thought_positions,
    thought_text,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "data" / "sample" / "bench_tiny.tsv"
TOKENS = ThoughtTokens(start_id=1, end_id=2, pad_id={"sam": 3, "depth": 4, "dino": 5})


# ----------------------------------------------------------------------------- pieces
def test_answer_is_taken_from_the_answer_tags_as_vlmevalkit_does():
    assert extract_answer("<think> Because ... </think><answer> B </answer>") == "B"
    assert extract_answer("< Answer >The cat.</ answer>\n") == "The cat."
    assert extract_answer("  plain reply \n") == "plain reply"


def test_the_chain_shows_each_visual_thought_as_its_anchor_and_count():
    text = (f"<think> Because the depth map of the image is {thought_text('depth')}, "
            f"and {ANCHOR_START}{pad_token('sam')}{ANCHOR_END} </think><answer> A </answer><|im_end|>")
    chain, anchors = thought_chain(text)
    assert chain == ("<think> Because the depth map of the image is [depth x4], and [sam x1] </think>"
                     "<answer> A </answer>")
    assert anchors == ["depth"]  # the one-pad sam thought is incomplete


def test_thought_positions_finds_complete_spans_only():
    ids = [9, 1, 4, 4, 4, 4, 2, 9, 1, 3, 3, 2, 1, 5, 5, 5, 5, 2]
    assert thought_positions(ids, TOKENS, offset=100) == [("depth", [102, 103, 104, 105]),
                                                          ("dino", [113, 114, 115, 116])]


def test_span_completer_forces_the_rest_of_a_started_thought():
    completer = ThoughtSpanCompleter(TOKENS)
    assert completer.forced([9, 1]) is None  # which anchor is the model's choice
    assert completer.forced([9, 1, 4]) == 4
    assert completer.forced([9, 1, 4, 4, 4, 4]) == 2
    assert completer.forced([9, 4]) is None  # a pad outside a thought is left alone
    scores = completer(torch.tensor([[9, 1, 4, 4]]), torch.zeros(1, 8))
    assert scores[0].argmax().item() == 4 and scores[0, 0] < -1e30


def test_option_matching_follows_vlmevalkit_exact_matching():
    options = {"A": "A dog", "B": "A tabby cat", "C": "A horse", "D": "A bird"}
    assert match_option("B", options) == "B"
    assert match_option("(C) A horse.", options) == "C"
    assert match_option("The answer is D.", options) == "D"
    assert match_option("It is a tabby cat.", options) == "B"  # no letter: the one option text it contains
    assert match_option("A or B", options) == ""  # two letters: no answer
    assert match_option("B, because the animal in the picture clearly has stripes and whiskers", options) == ""


def test_the_bundled_benchmark_reads_in_vlmevalkit_layout_and_prompts_as_it_does():
    questions = read_benchmark(BENCH)
    assert len(questions) == 9
    assert {q.category for q in questions} == {"object", "scene", "spatial", "text"}
    q = questions[2]
    assert q.image.size[0] <= 160 and q.answer == "C" and list(q.options) == ["A", "B", "C", "D"]
    assert mcq_prompt(q) == ("Question: What animal is in the image?\nOptions:\nA. A dog\nB. A horse\nC. A tabby cat\n"
                             "D. A bird\nPlease select the correct answer from the options above. \n")


def test_accuracy_per_category_and_the_table():
    result = ModelResult("m", "dir", False, predictions=[
        {"category": "x", "correct": True, "choice": "A", "thoughts": ["sam"]},
        {"category": "x", "correct": False, "choice": "", "thoughts": []},
        {"category": "y", "correct": True, "choice": "C", "thoughts": []},
        {"category": "y", "correct": True, "choice": "B", "thoughts": ["depth"]},
    ])
    s = result.summary()
    assert s["accuracy"] == 0.75 and s["categories"] == {"x": 0.5, "y": 1.0}
    assert s["answered"] == 0.75 and s["thought_rate"] == 0.5
    table = markdown_table([s, {**s, "name": "other"}])
    assert table.splitlines()[0] == "| | m | other |"
    assert "| **overall** (4 questions) | 75.0 | 75.0 |" in table
    assert "| visual thoughts emitted | 50.0 | 50.0 |" in table


def test_questions_file_as_json_or_jsonl(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"image": "a.jpg", "question": "Q1"}\n\n'
                                      '{"image": "/x/b.jpg", "question": "Q2"}\n')
    items = read_questions(tmp_path / "q.jsonl")
    assert [i["image"] for i in items] == [str(tmp_path / "a.jpg"), "/x/b.jpg"]
    (tmp_path / "q.json").write_text('[{"image": "a.jpg"}]')
    with pytest.raises(ValueError, match="entry 0 lacks \\['question'\\]"):
        read_questions(tmp_path / "q.json")


@pytest.mark.parametrize("stage", ["understanding", "generation", "reasoning", "efficient_reasoning"])
def test_the_control_formats_every_stage_as_the_plain_answer(stage):
    from covt.config import STAGE_NAMES
    from trainer.batch import sample_text
    from trainer.formats import plain_text
    from trainer.settings import BatchSettings

    assert stage in STAGE_NAMES
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.thoughts=false"])
    conversation = json.loads((REPO / "data/sample/conversations.json").read_text())[0]["conversations"]
    sample = {"index": 3, "key": "k", "id": "astronaut", "conversations": conversation}
    text = sample_text(sample, stage, cfg.anchors, step=5, settings=BatchSettings.from_config(cfg))
    assert text == plain_text(conversation)
    assert ANCHOR_START not in text.prompt + text.labelled and "<think>" not in text.labelled
    with_thoughts = sample_text(sample, stage, cfg.anchors, step=5,
                                settings=BatchSettings.from_config(load_config(REPO / "configs/tiny.yaml")))
    if stage != "efficient_reasoning":  # stage 4 may draw a plain answer itself
        assert ANCHOR_START in with_thoughts.prompt + with_thoughts.labelled


def test_the_control_switches_every_anchor_loss_off():
    from trainer.schedule import Schedule
    from trainer.settings import head_anchors, schedule_stages

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.thoughts=false"])
    schedule = Schedule(schedule_stages(cfg.train))
    assert not any(schedule.stage_at(s).anchor_losses_on for s in range(schedule.total_steps))
    assert head_anchors(cfg) == ()
    on = Schedule(schedule_stages(load_config(REPO / "configs" / "tiny.yaml").train))
    assert on.stage_at(0).anchor_losses_on


# ----------------------------------------------------------------------------- on the trained tiny run
@pytest.mark.slow
def test_generate_prints_answers_with_their_chain(e2e_trained, tmp_path, run_trainer):
    final = e2e_trained / "final"
    image = REPO / "data/sample/images/chelsea.jpg"
    common = ["--model", str(final), "--image-size", "112", "--max-new-tokens", "12"]
    one = run_trainer(["generate", *common, "--image", str(image), "--question", "What animal is in the image?"])
    lines = one.stdout.splitlines()
    assert lines[0] == f"image:    {image}" and lines[1] == "question: What animal is in the image?"
    assert lines[2].startswith("visual thoughts: ") and lines[3].startswith("chain: ")
    starts = [line[:10] for line in lines if line and not line.startswith(" " * 10)]  # continuation lines indented
    assert starts[:5] == ["image:    ", "question: ", "visual tho", "chain:    ", "answer:   "]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"image": str(REPO / "data/sample/images" / name),
                                                          "question": "What is shown?"}) + "\n"
                                              for name in ("chelsea.jpg", "coins.jpg", "rocket.jpg")))
    many = run_trainer(["generate", *common, "--questions", str(tmp_path / "q.jsonl"), "--batch-size", "2", "--json"])
    answers = [json.loads(line) for line in many.stdout.splitlines() if line.startswith("{")]
    assert [Path(a["image"]).name for a in answers] == ["chelsea.jpg", "coins.jpg", "rocket.jpg"]
    assert all(set(a) >= {"answer", "chain", "thoughts", "text"} for a in answers)
    again = run_trainer(["generate", *common, "--questions", str(tmp_path / "q.jsonl"), "--batch-size", "2", "--json"])
    assert again.stdout == many.stdout  # greedy: the same answers every time


@pytest.mark.slow
def test_ablation_blanks_the_thoughts_for_later_tokens_only(e2e_trained):
    from PIL import Image

    from inference.generate import ImageSizing, ablate_thoughts, encode_prompts, load_model, model_thought_tokens
    from trainer.model import last_hidden_states

    vlm, processor = load_model(e2e_trained / "final")
    tokens = model_thought_tokens(processor)
    image = Image.open(REPO / "data/sample/images/coffee.jpg")
    inputs = encode_prompts(processor, [image], [f"Look: {thought_text('depth')} and answer."],
                            ImageSizing(image_size=112))
    ids = inputs["input_ids"][0]
    pads = (ids == tokens.pad_id["depth"]).nonzero().flatten()
    assert len(pads) == 4  # the prompt carries one depth thought

    def last_states():
        with torch.no_grad():
            return last_hidden_states(vlm, inputs)[0]

    plain = last_states()
    with ablate_thoughts(vlm, tokens):
        ablated = last_states()
    before, after = slice(0, int(pads[0])), slice(int(pads[-1]) + 1, None)
    torch.testing.assert_close(ablated[before], plain[before], atol=0, rtol=0)  # causal: nothing earlier changes
    assert not torch.allclose(ablated[after], plain[after])  # what comes after read the blanked thought
    torch.testing.assert_close(last_states(), plain, atol=0, rtol=0)  # the hooks are gone once the context closes


@pytest.mark.slow
def test_evaluate_base_and_trained_side_by_side(e2e_workdir, e2e_trained, tmp_path, run_trainer):
    out = tmp_path / "eval"
    proc = run_trainer(["evaluate", "--model", str(e2e_workdir / "base"), "--model", str(e2e_trained / "final"),
                        "--benchmark", str(BENCH), "--out", str(out), "--image-size", "112", "--max-new-tokens", "16",
                        "--batch-size", "5", "--ablate-thoughts"])
    report = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in report["models"]]
    # the tiny run's model (seven steps from random weights) writes no visual thought pad, and the base model has
    # none: ablating them would change no answer, so neither runs again (tests/test_learn.py ablates a model's
    # thoughts that it wrote)
    assert names == ["base", "final"]
    assert all(p["thought_pads"] == 0 for p in report["predictions"]["final"])
    assert "final: wrote no visual thought, so it is not run again" in proc.stderr
    for model in report["models"]:
        assert model["questions"] == 9 and 0 <= model["accuracy"] <= 1 and 0 <= model["thought_rate"] <= 1
        assert set(model["categories"]) == {"object", "scene", "spatial", "text"}
        predictions = report["predictions"][model["name"]]
        assert model["accuracy"] == np.mean([p["choice"] == p["answer"] for p in predictions])
    table = (out / "results.md").read_text()
    assert "| | base | final |" in table and table.split("\n\n", 1)[1].strip() in proc.stdout


@pytest.mark.slow
def test_gradient_norm_is_logged_beside_the_losses(e2e_trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (e2e_trained / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    tb = EventAccumulator(str(e2e_trained / "tb")).Reload()
    assert [e.step for e in tb.Scalars("grad_norm")] == [r["step"] for r in rows]


@pytest.mark.slow
def test_the_control_trains_the_same_schedule_without_thoughts(e2e_workdir, e2e_overrides, run_trainer):
    run_trainer(["--config", "configs/tiny.yaml", *e2e_overrides(e2e_workdir, "control"), "train.thoughts=false"])
    control = e2e_workdir / "control"
    rows = [json.loads(line) for line in (control / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["understanding"] * 2 + ["generation"] * 2 + ["reasoning"] + \
        ["efficient_reasoning"] * 2
    assert not any(r["anchor_losses"] for r in rows)
    assert all(set(r) & {"sam", "depth", "dino"} == set() and r["loss"] == r["text"] for r in rows)
    assert (control / "final" / "config.json").is_file()
    assert json.loads((control / "final" / "covt_heads.json").read_text())["anchors"] == []
    assert os.path.getsize(control / "final" / "covt_heads.safetensors") > 0


@pytest.mark.slow
def test_thoughts_png_decodes_every_head_beside_its_anchor(e2e_workdir, e2e_trained, tmp_path, run_trainer):
    import yaml
    from conftest import e2e_checkpoints
    from PIL import Image

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["precompute"]["checkpoints"] = e2e_checkpoints(e2e_workdir)  # the anchors the run's heads fit
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "thoughts.png"
    proc = run_trainer(["generate", "--model", str(e2e_trained / "final"), "--image",
                        str(REPO / "data/sample/images/rocket.jpg"), "--question", "What is shown in the image?",
                        "--image-size", "112", "--max-new-tokens", "8", "--config", str(tmp_path / "config.yaml"),
                        "--thoughts", str(out)])
    assert f"thoughts drawn: {out}" in proc.stdout
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (4 * 360, 756, 3)  # 4.0 x 8.4 inches at 90 dpi a row: the image, then sam, depth, dino
    assert picture.std() > 20  # drawn panels, not a blank page


@pytest.mark.slow
def test_thoughts_png_from_generated_thoughts(e2e_workdir, e2e_trained):
    """A chain the model emitted is read at its own positions (a prompt makes the tiny model emit one)."""
    from PIL import Image

    from inference.generate import GenerationSettings, ImageSizing, generate_answers, load_model
    from inference.thoughts import thought_states
    from trainer.tokens import thought_tokens

    vlm, processor = load_model(e2e_trained / "final")
    image = Image.open(REPO / "data/sample/images/rocket.jpg")
    generated = generate_answers(vlm, processor, [image], ["Hi"], ImageSizing(image_size=112),
                                 GenerationSettings(max_new_tokens=2), names=["rocket"])
    # splice a complete depth thought into the "generated" answer, as if the model had emitted it
    tokens = thought_tokens(processor.tokenizer)
    thought = torch.tensor([[tokens.start_id] + [tokens.pad_id["depth"]] * 4 + [tokens.end_id]])
    generated.sequences = torch.cat([generated.sequences, thought], dim=1)
    n = generated.sequences.shape[1]
    generated.answers[0].thought_spans = [("depth", list(range(n - 5, n - 1)))]
    states = thought_states(vlm, processor, generated, image, ["depth", "dino"], image_size=112)
    assert states["depth"][1] == "generated" and states["dino"][1].startswith("stage-2")
    assert states["depth"][0].shape == (1, 4, vlm.config.text_config.hidden_size)


@pytest.mark.slow
def test_a_batch_row_reads_as_that_answer_generated_alone(e2e_trained):
    """Generated.row(i): a batched answer's prompt without its left padding, its own image, its thoughts at their
    own positions, so the learn report reads each answer of a batch as one generated alone."""
    from PIL import Image

    from inference.generate import GenerationSettings, ImageSizing, generate_answers, load_model
    from inference.thoughts import thought_states
    from trainer.tokens import thought_tokens

    vlm, processor = load_model(e2e_trained / "final")
    images = [Image.open(REPO / "data/sample/images" / name) for name in ("rocket.jpg", "coffee.jpg", "page.jpg")]
    questions = ["Hi", "What is shown in the image, and where in the picture is it?", "Read it."]
    sizing, settings = ImageSizing(image_size=112), GenerationSettings(max_new_tokens=2)
    tokens = thought_tokens(processor.tokenizer)
    thought = torch.tensor([[tokens.start_id] + [tokens.pad_id["depth"]] * 4 + [tokens.end_id]])

    def with_thought(generated):  # as if each answer had ended with a complete depth thought
        generated.sequences = torch.cat([generated.sequences, thought.expand(len(generated.answers), -1)], dim=1)
        n = generated.sequences.shape[1]
        for answer in generated.answers:
            answer.thought_spans = [("depth", list(range(n - 5, n - 1)))]
        return generated

    batch = with_thought(generate_answers(vlm, processor, images, questions, sizing, settings))
    assert int((batch.inputs["attention_mask"] == 0).sum()) > 0  # the prompts were left-padded
    for i in range(len(questions)):
        alone = with_thought(generate_answers(vlm, processor, images[i:i + 1], questions[i:i + 1], sizing, settings))
        row = batch.row(i)
        assert torch.equal(row.sequences, alone.sequences)
        assert row.answers[0].thought_spans == alone.answers[0].thought_spans
        assert row.inputs.keys() == alone.inputs.keys()
        for key, value in alone.inputs.items():
            assert torch.allclose(row.inputs[key], value), key
        own = thought_states(vlm, processor, row, images[i], ["depth"], image_size=112)["depth"][0]
        expected = thought_states(vlm, processor, alone, images[i], ["depth"], image_size=112)["depth"][0]
        torch.testing.assert_close(own, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_validation_split_is_cached_apart_and_scored_every_n_steps(tmp_path, e2e_workdir, run_trainer):
    from shards.reader import Cache

    cache = tmp_path / "cache"
    checkpoints = e2e_checkpoints_overrides(e2e_workdir)
    base = ["--config", "configs/tiny.yaml", f"cache.dir={cache}", "anchors=[depth,dino]", "data.validation=2",
            *checkpoints]
    proc = subprocess.run([sys.executable, "-m", "precompute", *base], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(Cache(cache)) == 5 and len(Cache(cache / "validation")) == 2  # 7 sample records, 2 held out
    held_out = {Cache(cache / "validation").sample(i)["id"] for i in range(2)}
    assert held_out == {"hubble", "page"}  # the last two records
    assert not held_out & {Cache(cache).sample(i)["id"] for i in range(5)}
    run_trainer([*base, f"model.path={e2e_workdir / 'base'}", f"train.output_dir={tmp_path / 'run'}",
                 "train.validate_every=2", "train.batch_size=1",
                 "train.stages=[{name: understanding, steps: 2, merge_after: true}, "
                 "{name: reasoning, steps: 1, merge_after: true}]"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("validation" in r) for r in rows] == [False, True, False]
    assert set(rows[1]["validation"]) == {"text", "depth", "dino"}
    assert all(np.isfinite(v) for v in rows[1]["validation"].values())


def e2e_checkpoints_overrides(root: Path) -> list[str]:
    from conftest import e2e_checkpoints

    return [f"precompute.checkpoints.{name}={json.dumps(spec)}" for name, spec in e2e_checkpoints(root).items()]


def test_training_and_generate_never_import_precompute():
    """Only `generate --thoughts` (inference/thoughts.py) loads the anchor models; the phases share covt and shards."""
    code = ("import sys, trainer.train, inference.generate, inference.evaluate, trainer.validation\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'precompute'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_force_thoughts_prefills_the_answer_with_the_opening_of_every_visual_chain(tmp_path):
    from PIL import Image

    from inference.generate import THOUGHT_OPENING, GenerationSettings, ImageSizing, generate_answers, load_model
    from trainer.formats import reasoning_answer
    from trainer.tiny_model import build_tiny_base_model
    from trainer.tokens import add_thought_tokens

    assert reasoning_answer("B", ["depth"]).startswith(THOUGHT_OPENING + " ")
    vlm, processor = load_model(build_tiny_base_model(tmp_path / "base"))
    add_thought_tokens(processor, vlm)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    sizing = ImageSizing(image_size=112)
    plain, forced = (generate_answers(vlm, processor, [image], ["What is it?"], sizing,
                                      GenerationSettings(max_new_tokens=2, force_thoughts=force))
                     for force in (False, True))
    opening = processor.tokenizer(THOUGHT_OPENING, add_special_tokens=False)["input_ids"]
    prompt = forced.inputs["input_ids"][0].tolist()
    assert prompt[-len(opening):] == opening and prompt[:-len(opening)] == plain.inputs["input_ids"][0].tolist()
    assert forced.answers[0].text.startswith(THOUGHT_OPENING) and forced.answers[0].chain.startswith(THOUGHT_OPENING)
    assert not plain.answers[0].text.startswith(THOUGHT_OPENING)


def test_the_training_prompt_layout_is_the_prompt_the_stage_formats_train_on(tmp_path):
    from inference.generate import PROMPT_LAYOUTS, prompt_text
    from trainer.formats import plain_text
    from trainer.tiny_model import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(), image_size=112)
    question = mcq_prompt(read_benchmark(BENCH)[0])
    trained = plain_text([{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "A"}])
    assert prompt_text(processor, question, layout="training") == trained.prompt
    # VLMEvalKit's chat template differs from it only by the newline before each <|im_end|>
    chat = prompt_text(processor, question, layout="chat_template")
    assert chat != trained.prompt and chat == trained.prompt.replace("\n<|im_end|>", "<|im_end|>")
    assert PROMPT_LAYOUTS == ("chat_template", "training")
    with pytest.raises(ValueError, match="prompt layout 'other'"):
        prompt_text(processor, question, layout="other")


def test_the_thoughts_picture_escapes_control_characters_of_the_generated_text():
    """A random model's chain held chr(23), which no font draws (matplotlib warned of the missing glyph)."""
    from inference.thoughts import printable

    assert printable("yer\x17#\té 中") == "yer\\x17#\\té 中"
