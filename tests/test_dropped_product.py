"""trainer/dropped_product.py (train.lora.fused_dropout): the dropout drawn inside the rank-r product's Triton
kernels is dropout then the product, forward and backward, with the masks the kernels draw; and the tiny VLM with
the switch on trains as peft computes it. Run in Triton's interpreter on the CPU (fp32: the interpreter's bf16
products are wrong), each check in a process of its own (the interpreter is chosen when triton is imported)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

KERNELS = r"""
import json, sys
import torch
sys.path.insert(0, ".")
from trainer.dropped_product import dropped_product, fused_lora_a, keep_mask

def reference(x, weight, keep, p):
    return torch.nn.functional.linear(torch.where(keep, x / (1 - p), torch.zeros_like(x)), weight)

out = {}
g = torch.Generator().manual_seed(0)
for rows, features, rank, p in [(40, 70, 16, 0.3), (33, 150, 8, 0.01), (64, 64, 24, 0.5), (200, 70, 16, 0.2)]:
    x = torch.randn(rows, features, generator=g, requires_grad=True)
    weight = torch.randn(rank, features, generator=g, requires_grad=True)
    grad = torch.randn(rows, rank, generator=g)
    seed = torch.tensor([1234 + rows], dtype=torch.int64)
    keep = keep_mask((rows, features), seed, p)
    h = dropped_product(x, weight, seed, p)
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
from torch.utils.flop_counter import FlopCounterMode
x = torch.randn(40, 70, requires_grad=True)
with FlopCounterMode(display=False) as counted:
    fused_lora_a(linear.train(), 0.3, x).sum().backward()
with FlopCounterMode(display=False) as plain:
    linear(torch.nn.functional.dropout(x, 0.3)).sum().backward()
out["flops"] = [counted.get_total_flops(), plain.get_total_flops()]
print(json.dumps(out))
"""

# The tiny VLM's forward and backward with the switch on against peft's dropout module, at a dropout rate so small
# that neither drops anything (the kernels' masks are checked above): the same loss and gradients through every
# adapter of the language model and the vision tower; and at 0.3, where it drops, back to peft's modules.
MODEL = r"""
import json, sys
import torch
sys.path.insert(0, ".")
sys.path.insert(0, "tests")
from covt.config import LoraConfig
from test_trainer_lora import image_inputs, load_with_new_rows, randomise_adapters
from trainer.lora import adapter_dropout, adapter_layers, attach_lora, replace_adapter_dropout

base_dir = sys.argv[1]

def step(p, fused, seed=0):
    vlm, new_ids = load_with_new_rows(base_dir)
    model = attach_lora(vlm, LoraConfig(dropout=p, fused_dropout=fused), new_ids).train()
    randomise_adapters(model)
    torch.manual_seed(seed)
    loss = model(**image_inputs(base_dir, new_ids)).logits.float().square().mean()
    loss.backward()
    return model, float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

out = {}
_, loss, grads = step(1e-12, False)
model, loss_f, grads_f = step(1e-12, True)
out["loss"] = [loss, loss_f]
out["grad_errors"] = {n: float((grads_f[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads.items()
                      if "lora_" in n}
layers = [l for l in adapter_layers(model) if hasattr(l, "lora_A")]
out["fused_adapters"] = sum(a.forward.func.__name__ == "fused_lora_a" for l in layers for a in l.lora_A.values())
out["adapters"] = sum(len(l.lora_A) for l in layers)
model, loss_a, _ = step(0.3, True)
out["dropping"] = [loss_a, step(0.3, True)[1], step(0.3, True, seed=1)[1]]
out["back_to_peft"] = replace_adapter_dropout(layers, None)
try:
    adapter_dropout(LoraConfig(fused_dropout=True, recompute_dropout=True))
except ValueError as e:
    out["both"] = str(e)
print(json.dumps(out))
"""


def interpreted(script: str, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_dropped_product_kernels_are_dropout_then_the_product():
    out = interpreted(KERNELS)
    # odd sizes: partial tiles, ranks padded to 16 and 32; 200 rows: the backward's groups of 3 row blocks, the last
    # group short
    for shape in ("40x70x16", "33x150x8", "64x64x24", "200x70x16"):
        assert max(out[shape]["errors"]) < 1e-5, (shape, out[shape])
    assert 0.55 < out["40x70x16"]["kept"] < 0.85 and out["33x150x8"]["kept"] > 0.95
    assert abs(out["keep_rate"] - 0.7) < 0.01  # 300k draws
    assert out["same_seed_same_bits"] and 0.3 < out["other_seed_other_bits"] < 0.5
    assert out["seeded_by_torch"] and out["shape"] == [5, 7, 16] and out["eval_is_the_product"]
    assert out["flops"][0] == out["flops"][1] == 3 * 2 * 40 * 70 * 16  # the bench's MFU counts the kernels' products


@pytest.mark.slow
def test_the_tiny_vlm_with_fused_dropout_trains_as_peft_computes_it(tmp_path):
    from trainer.tiny_model import build_tiny_base_model

    base_dir = build_tiny_base_model(tmp_path / "base", seed=0, image_size=112)
    out = interpreted(MODEL, str(base_dir))
    assert out["fused_adapters"] == out["adapters"] > 0, out
    loss, loss_f = out["loss"]
    assert abs(loss_f - loss) <= 1e-5 * abs(loss), out["loss"]
    assert len(out["grad_errors"]) == 2 * out["adapters"]  # every lora_A and lora_B
    assert max(out["grad_errors"].values()) < 1e-4, out["grad_errors"]
    same_seed, again, other_seed = out["dropping"]
    assert same_seed == again and other_seed != same_seed and same_seed != loss_f  # the seed from torch's generator
    assert out["back_to_peft"] == out["adapters"]
    assert "set one of them" in out["both"]


needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                reason="the kernels compiled for a GPU: needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("rows, features, rank, p, dtype", [
    (2432, 3584, 16, 0.01, "bfloat16"),  # micro-batch 4's tokens into the 7B language model's q/k/v/o, gate, up
    (2432, 18944, 16, 0.01, "bfloat16"),  # ... and into its down projection
    (333, 1000, 8, 0.5, "bfloat16"),
    (608, 3584, 16, 0.3, "float32"),
])
def test_on_cuda_the_kernels_are_dropout_then_the_product(rows, features, rank, p, dtype):
    """On the GPU, in the model's dtype: within bf16 rounding of dropout then the product in float64, with the
    kernels' own masks (sums in fp32; the input's gradient rounded once to its dtype)."""
    import torch

    from trainer.dropped_product import dropped_product, keep_mask

    dtype = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, features, generator=g, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(rank, features, generator=g, device="cuda", requires_grad=True)
    grad = torch.randn(rows, rank, generator=g, device="cuda", dtype=dtype)
    seed = torch.tensor([1234 + rows], dtype=torch.int64, device="cuda")
    keep = keep_mask((rows, features), seed, p)
    dropped_product(x, weight, seed, p).backward(grad)  # the output checked below, from the same seed
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    ref = torch.nn.functional.linear(torch.where(keep, x64 / (1 - p), torch.zeros_like(x64)), w64.to(dtype).double())
    ref.backward(grad.double())
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the weight is cast to bf16 as autocast casts it
    for name, got, want in (("output", dropped_product(x, weight, seed, p), ref), ("dx", x.grad, x64.grad),
                            ("dw", weight.grad, w64.grad)):
        error = float((got.double() - want).abs().max() / want.abs().max())
        assert error < tolerance, (name, error)
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.01


@needs_cuda
def test_on_cuda_it_compiles_whole_and_replays_in_a_cuda_graph_with_fresh_masks():
    """As the trainer runs it: inside torch.compile's code without a graph break (fullgraph), and inside a CUDA
    graph, where each replay draws a new seed from torch's generator (other masks, so other outputs)."""
    import torch

    from trainer.dropped_product import fused_lora_a

    linear = torch.nn.Linear(3584, 16, bias=False, device="cuda").train()
    x = torch.randn(608, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def adapter(x):
        with torch.autocast("cuda", torch.bfloat16):
            return fused_lora_a(linear, 0.01, x) * 2

    torch.compiler.reset()
    compiled = torch.compile(adapter, fullgraph=True)
    compiled(x).float().sum().backward()
    assert linear.weight.grad is not None and x.grad is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph
            adapter(x).float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = adapter(x)
        out.float().sum().backward()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
    assert float((first - out).abs().max() / first.abs().max()) < 0.5  # 1% of the inputs dropped differently


@needs_cuda
def test_on_cuda_compiled_code_takes_new_token_counts():
    """The trainer's compiled blocks see a new token count at nearly every micro-batch, and dynamo then compiles
    them for symbolic sizes: the kernels' grids and groups follow the sizes (an interpreter cannot check this: its
    kernels are not the JIT functions that fake tensors trace past)."""
    import torch

    from trainer.dropped_product import fused_lora_a

    linear = torch.nn.Linear(3584, 16, bias=False, device="cuda").train()

    def adapter(x):
        with torch.autocast("cuda", torch.bfloat16):
            return fused_lora_a(linear, 0.01, x)

    torch.compiler.reset()
    compiled = torch.compile(adapter, dynamic=True, fullgraph=True)
    for tokens in (608, 1233, 2432):
        x = torch.randn(tokens, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = compiled(x)
        out.float().sum().backward()
        plain = x.detach() @ linear.weight.detach().to(torch.bfloat16).t()  # what 1% dropout barely changes
        assert out.shape == (tokens, 16) and x.grad.shape == x.shape
        assert float((out.float() - plain.float()).norm() / plain.float().norm()) < 0.2
