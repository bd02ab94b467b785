"""bench/fused_adapter.py (the prototype bench_adapters.py times): the dropout drawn inside the rank-r product's
kernels is dropout then the product, forward and backward, with the masks the kernels draw; run in Triton's
interpreter on the CPU (fp32), in a process of its own (the interpreter is chosen when triton is imported)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import torch
sys.path.insert(0, ".")
from bench.fused_adapter import DroppedProduct, fused_lora_a, keep_mask

def reference(x, weight, keep, p):
    return torch.nn.functional.linear(torch.where(keep, x / (1 - p), torch.zeros_like(x)), weight)

out = {}
g = torch.Generator().manual_seed(0)
for rows, features, rank, p in [(40, 70, 16, 0.3), (33, 150, 8, 0.01), (64, 64, 24, 0.5)]:
    x = torch.randn(rows, features, generator=g, requires_grad=True)
    weight = torch.randn(rank, features, generator=g, requires_grad=True)
    grad = torch.randn(rows, rank, generator=g)
    seed = torch.tensor([1234 + rows], dtype=torch.int64)
    keep = keep_mask((rows, features), seed, p)
    h = DroppedProduct.apply(x, weight, seed, p)
    h.backward(grad)
    dx, dw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    ref = reference(x, weight, keep, p)
    ref.backward(grad)
    errors = [float((a - b).abs().max() / b.abs().max()) for a, b in ((h, ref), (dx, x.grad), (dw, weight.grad))]
    out[f"{rows}x{features}x{rank}"] = {"errors": errors, "kept": float(keep.float().mean())}
seed = torch.tensor([7], dtype=torch.int64)
big = keep_mask((300, 1000), seed, 0.3)
out["keep_rate"] = float(big.float().mean())
out["same_seed_same_bits"] = bool(torch.equal(big, keep_mask((300, 1000), seed, 0.3)))
out["other_seed_other_bits"] = float((big != keep_mask((300, 1000), torch.tensor([8]), 0.3)).float().mean())
linear = torch.nn.Linear(70, 16, bias=False)
x = torch.randn(5, 7, 70, generator=g)
torch.manual_seed(3)
first = fused_lora_a(linear.train(), 0.3, x)
torch.manual_seed(3)
out["seeded_by_torch"] = bool(torch.equal(first, fused_lora_a(linear, 0.3, x)))
out["shape"] = list(first.shape)
out["eval_is_the_product"] = bool(torch.equal(fused_lora_a(linear.eval(), 0.3, x), linear(x)))
print(json.dumps(out))
"""


def test_dropped_product_kernels_are_dropout_then_the_product():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for shape in ("40x70x16", "33x150x8", "64x64x24"):  # odd sizes: partial tiles, ranks padded to 16 and 32
        assert max(out[shape]["errors"]) < 1e-5, (shape, out[shape])
    assert 0.55 < out["40x70x16"]["kept"] < 0.85 and out["33x150x8"]["kept"] > 0.95
    assert abs(out["keep_rate"] - 0.7) < 0.01  # 300k draws
    assert out["same_seed_same_bits"] and 0.3 < out["other_seed_other_bits"] < 0.5
    assert out["seeded_by_torch"] and out["shape"] == [5, 7, 16] and out["eval_is_the_product"]
