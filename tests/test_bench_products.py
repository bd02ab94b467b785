"""bench/bench_projections.py and bench/bench_adapters.py on the CPU at a small width: they time what they say and
write it."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", *args], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_projection_bench_times_each_group_separate_and_concatenated(tmp_path):
    out = tmp_path / "projections.json"
    proc = run("bench_projections.py", "--tokens", "32,64", "--scale", "0.03125", "--iters", "2", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result) == {"32_qkv", "32_gate_up", "64_qkv", "64_gate_up"}
    for row in result.values():
        for part in ("forward", "input_grad"):
            separate, one = row[f"{part}_separate_ms"], row[f"{part}_concatenated_ms"]
            assert separate > 0 and one > 0 and row[f"{part}_ratio"] == separate / one
    assert "| 64 | gate_up |" in proc.stdout


def test_the_adapter_bench_times_the_frozen_product_and_peft_adapter_over_it(tmp_path):
    """Eagerly and through torch.compile (``default``), and split-K (train.lora.split_k)."""
    out = tmp_path / "adapters.json"
    proc = run("bench_adapters.py", "--tokens", "32", "--scale", "0.03125", "--modes", "eager,default,eager_split_k",
               "--iters", "2", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result) == {"language_32", "vision_32"}
    language = result["language_32"]
    assert set(language) == {"q", "k", "v", "o", "gate", "up", "down", "all"}
    assert language["all"]["base"] == sum(r["base"] for name, r in language.items() if name != "all")
    assert all(r["base"] > 0 and r["eager"] > 0 and r["default"] > 0 and r["eager_split_k"] > 0
               for r in language.values())
    assert "| vision | 32 | qkv |" in proc.stdout


def test_the_thin_product_bench_times_each_adapter_product_plain_and_split(tmp_path):
    """Every thin product of every projection, plain and at each slice count, each split checked against plain
    before it is timed; the trainer's own count reported beside the best."""
    out = tmp_path / "thin.json"
    proc = run("bench_thin_products.py", "--tokens", "40", "--scale", "0.0625", "--iters", "2", "--slices", "2,4",
               "--towers", "language", "--json", str(out))
    result = json.loads(out.read_text())
    assert len(result) == 7 * 4  # q, k, v, o, gate, up, down; four thin products each
    down = result["language_40_down_A_forward"]  # 1184 wide: the trainer splits it in 4
    assert down["chosen_slices"] == 4 and {"plain_us", "split_2_us", "split_4_us"} <= set(down)
    assert result["language_40_q_A_weight_grad"]["chosen_slices"] == 8  # over the tokens
    assert all(r["plain_us"] > 0 and r["best_us"] > 0 for r in result.values())
    assert "| language | 40 | gate | B input grad |" in proc.stdout
