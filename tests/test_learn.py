"""The learning experiment (bench/learn): the world is exact and seeded; the quick run really learns.

The slow test runs ``bench/learn/run.py --quick`` (the CPU variant of ``make learn``) with one more arm whose
anchor losses are off (every anchor's ``train.loss_weights`` 0): what it asserts is what a pipeline that stopped
learning cannot reach, and the broken arm shows it is not reached for free. One thread per process, so the
numbers do not depend on the machine's core count, and the independent runs go side by side. It runs in CI: about
4 minutes on an idle 2-core machine.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.learn.world import QUESTION_TYPES, samples, write_world
from inference.evaluate import mcq_prompt, read_benchmark
from precompute.parquet import COLUMNS

REPO = Path(__file__).resolve().parents[1]
# measured on two quick runs (README, "Does it learn?", 2026-12-05; one and two threads, whose training differs
# in the last bits): held-out DINO features decoded from the CoVT model's own thoughts, cosine 0.58 / 0.63, from
# another image's thoughts 0.29 / 0.25, the mean target 0.41 (the DINO head sees nothing but the thoughts);
# PIDINet edge L1 0.120 / 0.117 against the mean target's 0.227; 100% / 79% of free answers and 100% / 96% with
# the chain's opening prefilled emit complete visual thoughts; with the anchor losses off the DINO decoding's
# cosine is -0.11 / -0.08, another image's within 0.005 of it. The margins asserted keep 1.7x headroom or more.
DINO_OWN_OVER_OTHER = 0.15
DINO_OWN_OVER_MEAN = 0.10
PIDINET_L1_MARGIN = 0.03
FREE_EMISSION = 0.5
FORCED_EMISSION = 0.75


def test_the_world_is_deterministic_and_every_split_has_the_published_layout(tmp_path):
    first, again = samples(12, seed=3, side=56), samples(12, seed=3, side=56)
    assert [(s.question, s.answer, s.image.tobytes()) for s in first] == \
        [(s.question, s.answer, s.image.tobytes()) for s in again]
    assert {s.kind for s in first} == set(QUESTION_TYPES)
    out = write_world(tmp_path, train=12, held_out=6, bench=12, seed=0, side=56)
    table = pq.read_table(out / "train.parquet")
    assert tuple(table.column_names) == COLUMNS and table.num_rows == 12
    conversation = table.column("conversations")[0].as_py()
    questions = read_benchmark(out / "bench.tsv")
    assert len(questions) == 12 and {q.category for q in questions} == set(QUESTION_TYPES)
    # training asks exactly as the benchmark prompts (VLMEvalKit's MCQ prompt), the answer is the letter
    assert conversation[0]["value"].startswith("<image>\nQuestion: ") and conversation[1]["value"] in "ABCD"
    assert all(mcq_prompt(q).endswith("Please select the correct answer from the options above. \n")
               for q in questions)
    held_out = json.loads((out / "held_out.json").read_text())
    assert len(held_out) == 6 and all((out / "held_out" / r["image"]).is_file() for r in held_out)
    # the base model's samples: each question, the same answered in a sentence, the scene's description
    base = pq.read_table(out / "base.parquet")
    assert tuple(base.column_names) == COLUMNS and base.num_rows == 3 * 12
    answers = [c[1]["value"] for c in base.column("conversations").to_pylist()]
    assert answers[0] in "ABCD" and answers[1] == f"The answer is {answers[0]}." and "edge map" in answers[2]
    train_ids = set(table.column("id").to_pylist())
    assert not train_ids & {r["id"] for r in held_out}


def readme_example(subcommand: str) -> tuple[str, list[str]]:
    """README's ``python -m trainer SUBCOMMAND`` example on the learning experiment's models (continuation lines
    joined) and the lines of output it shows after its "..."."""
    block = re.search(rf"```\n(\$ python -m trainer {subcommand} --model runs/learn-quick/.*?)```",
                      (REPO / "README.md").read_text(), re.DOTALL).group(1)
    command, shown = block.split("\n...\n")
    return command.removeprefix("$ ").replace("\\\n", " "), shown.strip().splitlines()


NUMBER = re.compile(r"-?\d+(\.\d+)?")
# the lines of generate's and evaluate's output whose words do not depend on what the model learned
FIXED_LABELS = ("thoughts drawn", "results")


def output_shape(lines: list[str]) -> list[str]:
    """What an example's output keeps whatever the quick models learned: the labels of generate's lines (not
    the thoughts, chain and answer they show; not the chain's continuation lines, whose number varies), the
    paths it names, and evaluate's table with its numbers as ``#``. The models themselves differ from CPU to
    CPU: on 2026-12-06 an AMD EPYC host trained a CoVT model that writes an edge-map thought where the README's
    machine's wrote a depth one, and evaluate's accuracies moved with it; the learning asserted above held on
    both."""
    shape = []
    for line in lines:
        if line.startswith("|"):
            shape.append("|".join(" # " if NUMBER.fullmatch(cell.strip()) else cell for cell in line.split("|")))
        elif not line.startswith(" "):
            label, colon, _ = line.partition(":")
            shape.append(line if label in FIXED_LABELS else label + colon)
    return shape


def run_readme_example(subcommand: str, out: Path, env: dict) -> None:
    """The example as written, on the run in ``out`` (bash: generate's question uses $'...' quoting); what it
    prints ends with what README shows, up to what the models learned (:func:`output_shape`)."""
    command, shown = readme_example(subcommand)
    command = command.replace("runs/learn-quick", str(out)).replace("python ", f"{sys.executable} ", 1)
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.replace(str(out), "runs/learn-quick").strip().splitlines()
    expected = output_shape(shown)
    assert output_shape(printed)[-len(expected):] == expected, (subcommand, printed)


def emitting(shares: dict) -> float:
    """The share of answers with at least one complete visual thought."""
    return shares["stage3_every_anchor"] + shares["stage4_subset"]



def test_the_gpu_plan_gives_each_run_its_loader_workers(tmp_path):
    """One process loads ~55 samples/s at 112x112 (BENCHMARKS): the GPU plan's runs, resolved as the trainer
    resolves them, read their data with workers; the quick plan's with none."""
    import yaml

    from bench.learn.run import FULL, QUICK, base_config, base_model_overrides, covt_overrides
    from covt.config import load_config

    for plan, arm_workers, base_workers in ((FULL, 4, 8), (QUICK, 0, 0)):
        config = tmp_path / "learn.yaml"
        config.write_text(yaml.safe_dump(base_config(tmp_path, plan)))
        arm = load_config(config, covt_overrides(tmp_path, plan, "covt"))
        base = load_config(config, base_model_overrides(tmp_path, plan))
        assert (arm.train.num_workers, arm.precompute.num_workers, base.train.num_workers) == (
            arm_workers, arm_workers, base_workers)


def test_the_gpu_plan_runs_independent_commands_side_by_side_and_stops_on_a_failure(tmp_path, monkeypatch, capsys):
    import dataclasses

    from bench.learn.run import FULL, Experiment

    assert FULL.side_by_side
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    exp = Experiment(tmp_path, dataclasses.replace(FULL, device="cpu"))
    handshake = tmp_path / "first-is-running"
    # the second command waits for the first one's file: it can only finish if both run at the same time
    exp.commands({"first": ["-c", f"import pathlib, time; pathlib.Path({str(handshake)!r}).touch(); time.sleep(1)"],
                  "second": ["-c", f"import pathlib, time\nfor _ in range(200):\n"
                                   f"    if pathlib.Path({str(handshake)!r}).exists(): break\n    time.sleep(0.05)\n"
                                   f"else: raise SystemExit('never ran beside the first')"]})
    assert set(exp.timings) == {"first", "second"}
    # each step says how it ended as it ends (what a poll of the background GPU run reads)
    assert re.search(r"\[learn\] second: exit 0 after [0-9.]+ s", capsys.readouterr().out)
    # runs side by side split the machine's cores between them
    exp.commands({name: ["-c", f"import os, pathlib; pathlib.Path({str(tmp_path / name)!r}).write_text("
                               "os.environ['OMP_NUM_THREADS'])"] for name in ("threads-a", "threads-b")})
    for name in ("threads-a", "threads-b"):
        assert int((tmp_path / name).read_text()) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(RuntimeError, match="(?s)step 'broken' failed .exit 3.*stderr of broken"):
        exp.commands({"fine": ["-c", "pass"],
                      "broken": ["-c", "import sys; sys.stderr.write('stderr of broken'); sys.exit(3)"]})


@pytest.mark.slow
def test_the_quick_experiment_learns(tmp_path):
    from bench.learn.run import QUICK

    out = tmp_path / "learn"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/learn/run.py", "--quick", "--out", str(out), "--arm",
                           "broken=train.loss_weights={pidinet: 0.0, dino: 0.0, depth: 0.0}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    covt, broken = (report["held_out_thoughts"][arm] for arm in ("covt", "broken"))
    dino, pidinet = covt["decoding"]["dino"], covt["decoding"]["pidinet"]
    # the thoughts carry the image: DINO's head sees nothing else, and another image's thoughts decode worse
    assert dino["own"]["cosine"] > dino["other_image"]["cosine"] + DINO_OWN_OVER_OTHER, dino
    assert dino["own"]["cosine"] > dino["mean_target"]["cosine"] + DINO_OWN_OVER_MEAN, dino
    assert pidinet["own"]["l1"] < pidinet["mean_target"]["l1"] - PIDINET_L1_MARGIN, pidinet
    # the model forms its visual thoughts: freely, and completes them once the chain is opened
    assert emitting(covt["emission"]) >= FREE_EMISSION, covt["emission"]
    assert emitting(covt["forced_emission"]) >= FORCED_EMISSION, covt["forced_emission"]
    # with the anchor losses off the same pipeline emits thoughts that decode to nothing better than the mean,
    # and whose content does not matter
    broken_dino = broken["decoding"]["dino"]
    assert broken_dino["own"]["cosine"] < broken_dino["mean_target"]["cosine"], broken_dino
    assert abs(broken_dino["own"]["cosine"] - broken_dino["other_image"]["cosine"]) < DINO_OWN_OVER_OTHER / 3
    assert broken["decoding"]["pidinet"]["own"]["l1"] > broken["decoding"]["pidinet"]["mean_target"]["l1"]
    assert "control" not in report["held_out_thoughts"]  # the control has no heads and no thoughts
    assert {"base", "control", "covt", "covt (thoughts ablated)", "covt (thoughts forced)",
            "covt_rows_first_run"} <= set(report["accuracy"])
    assert (out / "report.md").is_file() and (out / "pictures" / "validation.png").is_file()
    # each run's speed, and how much of each step waited for data (does the GPU plan need more workers?)
    assert set(report["speed"]) == {"base", "covt", "covt_rows_first_run", "control", "broken"}
    base_speed = report["speed"]["base"]
    assert base_speed["steps"] >= QUICK.base_steps - 2, base_speed
    assert 0 <= base_speed["data_seconds"] < base_speed["step_seconds"], base_speed
    assert "## Training speed per run" in (out / "report.md").read_text()
    assert all((out / p).is_file() for p in report["pictures"])
    # README's examples on these models: generate (the CoVT model) and evaluate (base, control, CoVT ablated)
    run_readme_example("generate", out, env)
    run_readme_example("evaluate", out, env)
