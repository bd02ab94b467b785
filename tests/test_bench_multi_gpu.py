"""bench/bench_multi_gpu.py --four-stages: the trainer's figures per stage of the recipe in miniature, on the CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_multi_gpu import (  # noqa: E402
    RECIPE_CONFIG,
    four_stage_table,
    miniature_recipe,
    per_segment_seconds,
    segment_steps,
    stage_configs,
)
from covt.config import load_config  # noqa: E402

SEGMENTS = ["stage 1 understanding", "stage 2 generation", "stage 3 reasoning", "stage 4 efficient_reasoning",
            "stage 4 efficient_reasoning (text only)"]


def test_the_miniature_has_every_part_of_the_recipe_and_the_projection_counts_the_recipes_steps():
    recipe = segment_steps(load_config(RECIPE_CONFIG).train.stages)
    assert list(recipe) == SEGMENTS and sum(recipe.values()) == 16000
    assert recipe["stage 4 efficient_reasoning (text only)"] == 2000  # anchor losses off from step 8000 of run 2
    assert segment_steps(stage_configs(miniature_recipe(4))) == dict.fromkeys(SEGMENTS, 4)


def test_steps_that_recorded_cuda_graphs_are_told_apart_from_replays():
    """train.cuda_graphs: a step that records a micro-batch graph runs warm-ups too; the replay rate of a stage is
    the median of its steps that recorded none (after the stage's first two), and a stage whose steps all recorded
    has none."""
    stages = miniature_recipe(4)  # steps 1-4, 5-8, 9-12, 13-16 and 17-20 (text only)
    recorded = {3: 1, 7: 2, 11: 1, 15: 1, 16: 1}  # step -> graphs recorded in it
    perf = [{"step": step, "seconds": 2.0 if step in recorded else 0.5 + step / 100,
             "graphs_recorded": recorded.get(step, 0)} for step in range(1, 21)]
    every = per_segment_seconds(stages, perf)
    replays = per_segment_seconds(stages, perf, replays_only=True)
    assert every["stage 1 understanding"] == 1.27 and replays["stage 1 understanding"] == 0.54  # step 4 alone
    assert replays["stage 2 generation"] == 0.58 and replays["stage 3 reasoning"] == 0.62
    assert "stage 4 efficient_reasoning" not in replays and every["stage 4 efficient_reasoning"] == 2.0
    assert replays["stage 4 efficient_reasoning (text only)"] == 0.695
    row = {"gpus": 1, "zero": "none", "micro_batch": 4, "recipe_hours": 1.0,
           "samples_per_s": {k: 8 / v for k, v in every.items()},
           "replay_samples_per_s": {k: 8 / v for k, v in replays.items()},
           "graphs_recorded": 6, "steps_recording": 5, "steps_timed": 20}
    table = four_stage_table([row])
    line = "| steps that recorded no graph (5 of 20 steps recorded 6) | 14.81 | 13.79 | 12.90 | - | 11.51 | - |"
    assert line in table


@pytest.mark.slow
def test_four_stage_throughput_runs_the_whole_recipe_on_the_cpu(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "bench/bench_multi_gpu.py", "--tiny", "--throughput", "1xnonex4xnockpt",
                           "--four-stages", "--steps", "4", "--work", str(tmp_path / "work"), "--json", str(out),
                           "--set", "train.packing=true", "train.lora.fp32_inputs=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert list(row["seconds_per_step"]) == SEGMENTS and all(v > 0 for v in row["seconds_per_step"].values())
    assert row["final_has_heads"] and row["grad_accum"] == 2
    assert row["overrides"] == ["train.packing=true", "train.lora.fp32_inputs=false"]
    [run] = [p for p in (tmp_path / "work").glob("recipe-*") if p.is_dir()]
    assert "packing: true" in (run / "config.yaml").read_text()
    hours = sum(row["recipe_steps"][s] * row["seconds_per_step"][s] for s in SEGMENTS) / 3600
    assert math.isclose(row["recipe_hours"], hours)
    assert "| 1 x none x 4 |" in proc.stdout
