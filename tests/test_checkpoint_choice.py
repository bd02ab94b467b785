"""Choosing a checkpoint: train.save_total_limit, ``--resume PATH``, and ``python -m trainer export`` of any step."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoint

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "data" / "sample" / "bench_tiny.tsv"


def save_steps(out: Path, steps, keep):
    model = torch.nn.Linear(2, 2)
    for step in steps:
        checkpoint.save_checkpoint(out, step, model, meta={}, keep=keep)
    return [p.name for _, p in checkpoint.list_checkpoints(out)]


def test_save_total_limit_keeps_the_newest_n_or_every_checkpoint(tmp_path):
    assert save_steps(tmp_path / "two", [1, 2, 3, 4], keep=2) == ["step-000003", "step-000004"]
    assert save_steps(tmp_path / "all", [1, 2, 3, 4], keep=None) == [f"step-00000{i}" for i in (1, 2, 3, 4)]


def test_a_named_checkpoint_is_found_by_path_or_name_and_a_wrong_one_lists_the_real_ones(tmp_path):
    save_steps(tmp_path, [3, 6], keep=None)
    third = tmp_path / "checkpoints" / "step-000003"
    assert checkpoint.named_checkpoint(tmp_path, third) == third
    assert checkpoint.named_checkpoint(tmp_path, "step-000003") == third
    with pytest.raises(FileNotFoundError, match=r"--resume step-000004: .*its checkpoints: step-000003, step-000006"):
        checkpoint.named_checkpoint(tmp_path, "step-000004")
    other = tmp_path / "other"
    save_steps(other, [3], keep=None)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint of train.output_dir"):
        checkpoint.named_checkpoint(tmp_path / "nothing", other / "checkpoints" / "step-000003")
    assert checkpoint.remove_checkpoints_after(tmp_path, 3) == [tmp_path / "checkpoints" / "step-000006"]
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [3]


# ----------------------------------------------------------------------------- on the trained tiny run (slow)
def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_keeping_every_checkpoint_then_resuming_from_a_named_one_retrains_the_same_steps(
        e2e_workdir, e2e_overrides, e2e_trained, run_trainer):
    out = e2e_workdir / "keep-all"
    args = ["--config", "configs/tiny.yaml", *e2e_overrides(e2e_workdir, "keep-all"), "train.save_total_limit=null"]
    run_trainer(args)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-00000{i}" for i in range(2, 8)]  # stage ends 2, 4, 5, 7 and save_every 3, 6
    proc = run_trainer([*args, "--resume", str(out / "checkpoints" / "step-000003")])
    assert "deleted the later checkpoint" in proc.stdout + proc.stderr
    assert metrics(out) == metrics(e2e_trained)  # steps 4-7 retrained from step 3: the same losses, bit for bit
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names


@pytest.mark.slow
def test_the_last_checkpoint_exports_as_the_final_folder(e2e_trained, tmp_path):
    from trainer.export_checkpoint import main

    out = tmp_path / "step7"
    assert main(["--checkpoint", str(e2e_trained / "checkpoints" / "step-000007"), "--out", str(out)]) == 0
    final = e2e_trained / "final"
    for name in ("model.safetensors", "covt_heads.safetensors"):
        exported, trained = load_file(out / name), load_file(final / name)
        assert exported.keys() == trained.keys()
        for key, value in trained.items():
            torch.testing.assert_close(exported[key], value, atol=0, rtol=0, msg=key)
    assert json.loads((out / "covt_heads.json").read_text()) == json.loads((final / "covt_heads.json").read_text())


@pytest.mark.slow
def test_a_mid_run_checkpoint_exports_to_a_folder_evaluate_scores(e2e_trained, tmp_path, run_trainer):
    out = tmp_path / "step6"
    proc = run_trainer(["export", "--checkpoint", str(e2e_trained / "checkpoints" / "step-000006"), "--out", str(out)])
    assert f"exported step 6: {out}" in proc.stdout
    base = e2e_trained / "lora_stage1_merged"  # step 6 is in run 1: its LoRA is merged into run 0's merge
    assert load_file(out / "model.safetensors").keys() == load_file(base / "model.safetensors").keys()
    scores = tmp_path / "scores"
    run_trainer(["evaluate", "--model", str(out), "--benchmark", str(BENCH), "--out", str(scores),
                 "--image-size", "112", "--max-new-tokens", "8"])
    [model] = json.loads((scores / "results.json").read_text())["models"]
    assert model["name"] == "step6" and model["questions"] == 9 and 0 <= model["accuracy"] <= 1
