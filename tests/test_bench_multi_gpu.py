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

from bench.bench_multi_gpu import RECIPE_CONFIG, miniature_recipe, segment_steps, stage_configs  # noqa: E402
from covt.config import load_config  # noqa: E402

SEGMENTS = ["stage 1 understanding", "stage 2 generation", "stage 3 reasoning", "stage 4 efficient_reasoning",
            "stage 4 efficient_reasoning (text only)"]


def test_the_miniature_has_every_part_of_the_recipe_and_the_projection_counts_the_recipes_steps():
    recipe = segment_steps(load_config(RECIPE_CONFIG).train.stages)
    assert list(recipe) == SEGMENTS and sum(recipe.values()) == 16000
    assert recipe["stage 4 efficient_reasoning (text only)"] == 2000  # anchor losses off from step 8000 of run 2
    assert segment_steps(stage_configs(miniature_recipe(4))) == dict.fromkeys(SEGMENTS, 4)


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
