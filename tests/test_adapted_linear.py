"""train.lora.accumulate_in_place: each LoRA layer as one autograd function (trainer/adapted_linear.py) computes
what peft's lora.Linear computes, with the same dropout masks, on the tiny VLM, eagerly and compiled, and on CUDA at
the 7B model's shapes."""
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from covt.config import LoraConfig
from tests.test_trainer_lora import dropout_step, image_inputs, load_with_new_rows, lora_modules, randomise_adapters
from trainer.adapted_linear import AccumulatingLoraLinear
from trainer.lora import accumulate_in_place, adapter_layers, attach_lora, cast_adapter_inputs, check_adapter_switches
from trainer.tiny_model import build_tiny_base_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the 7B shapes in bf16 run on CUDA")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_base_model(tmp_path_factory.mktemp("adapted") / "base", seed=0, image_size=112)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_the_tiny_vlm_gives_peft_loss_and_gradients_with_the_same_dropout_masks(base_dir):
    loss, grads, _, plain = dropout_step(base_dir, accumulate_in_place=False)
    loss_a, grads_a, _, model = dropout_step(base_dir, accumulate_in_place=True)
    assert loss_a == pytest.approx(loss, rel=1e-6)
    assert grads_a.keys() == grads.keys()
    for name, g in grads.items():  # a mask drawn differently moves whole rows: far past fp32 rounding
        assert relative(grads_a[name], g) < 1e-5, name
    assert dropout_step(base_dir, seed=6, accumulate_in_place=True)[0] != loss_a  # the masks change with the seed
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and merging see the same tensors


def test_it_switches_back_falls_back_to_peft_where_it_does_not_apply_and_drops_nothing_in_eval(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    model = attach_lora(vlm, LoraConfig(dropout=0.3, accumulate_in_place=True), new_ids).eval()
    randomise_adapters(model)
    layers = adapter_layers(model)
    adapters = len(lora_modules(model))
    assert sum(type(layer) is AccumulatingLoraLinear for layer in layers) == adapters  # no token layer
    with torch.no_grad():
        accumulated = model(**inputs).logits
        with model.disable_adapter():  # peft's own forward: the frozen model alone
            base = model(**inputs).logits
        assert accumulate_in_place(layers, False) == adapters
        assert not any(isinstance(layer, AccumulatingLoraLinear) for layer in layers)
        torch.testing.assert_close(model(**inputs).logits, accumulated, rtol=1e-5, atol=1e-5)
        assert accumulate_in_place(layers, True) == adapters and accumulate_in_place(layers, True) == 0
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=0)
    assert relative(accumulated, base) > 1e-3  # the adapters do change the logits


def projection(fan_in: int, fan_out: int, p: float, bias: bool = True, dtype=torch.float32, device="cpu"):
    """One frozen Linear with peft's LoRA (r 4, fp32 weights, a random B), as the trainer attaches it."""
    class Projection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(fan_in, fan_out, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Projection().to(device, dtype).requires_grad_(False),
                           PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False,
                                          target_modules=["proj"]))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    cast_adapter_inputs(adapter_layers(model), False)
    return model.train()


def forward_backward(model, x: torch.Tensor, grad: torch.Tensor, accumulate: bool, autocast: bool = False,
                     compiled: bool = False, seed: int = 5) -> list[torch.Tensor]:
    assert accumulate_in_place(adapter_layers(model), accumulate) in (0, 1)
    run = torch.compile(model, fullgraph=True) if compiled else model
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run(x)
    out.backward(grad)
    results = [out.detach().clone(), *[p.grad.clone() for p in model.parameters() if p.requires_grad]]
    if x.requires_grad:
        results.append(x.grad.clone())
        x.grad = None
    model.zero_grad(set_to_none=True)
    return results


@pytest.mark.parametrize("p, bias, input_grad", [(0.3, True, True), (0.0, False, True), (0.3, True, False)])
def test_one_projection_equals_peft_in_fp32_and_under_bf16_autocast(p, bias, input_grad):
    """fp32: to rounding; bf16 autocast: within 1e-2 (peft rounds the adapter's output and the sum apart, here the
    GEMM adds it before one rounding). Without dropout the input gradient is one accumulating product; without an
    input that needs a gradient (the first vision block's) none is made."""
    for dtype, autocast, bound in ((torch.float32, False, 1e-5), (torch.bfloat16, True, 1e-2)):
        model = projection(24, 40, p, bias, dtype)
        x = torch.randn(2, 7, 24, dtype=dtype, requires_grad=input_grad)
        grad = torch.randn(2, 7, 40, dtype=dtype)
        peft, ours = (forward_backward(model, x, grad, accumulate, autocast) for accumulate in (False, True))
        assert len(ours) == len(peft) == 3 + input_grad
        for name, a, b in zip(("output", "lora_A", "lora_B", "input"), ours, peft):
            assert a.dtype == b.dtype and relative(a, b) < bound, (dtype, name, relative(a, b))


@pytest.mark.parametrize("p", [0.3, 0.0])
def test_flop_counter_sees_the_products_peft_makes(p):
    """The bench's MFU counts the same products either way (an in-place ``addmm_`` would go uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = projection(24, 40, p)
    x = torch.randn(3, 24, requires_grad=True)
    counts = []
    for accumulate in (False, True):
        with FlopCounterMode(display=False) as counter:
            forward_backward(model, x, torch.randn(3, 40), accumulate)
        counts.append(counter.get_total_flops())
    # forward: the frozen product, A, B; backward: the input's gradient through W, B's and A's products
    assert counts[1] == counts[0] == 2 * 3 * (24 * 40 + 24 * 4 + 4 * 40) + 2 * 3 * (40 * 24 + 2 * 40 * 4 + 2 * 4 * 24)


def test_it_compiles_whole_to_what_it_computes_eagerly():
    """Inside torch.compile (train.compile's blocks) as one graph, without dropout: the eager function's values.
    (With dropout the compiled code draws its own masks, as compiled peft does.)"""
    model = projection(32, 48, 0.0)
    x = torch.randn(20, 32, requires_grad=True)
    grad = torch.randn(20, 48)
    eager = forward_backward(model, x, grad, accumulate=True)
    compiled = forward_backward(model, x, grad, accumulate=True, compiled=True)
    for a, b in zip(compiled, eager, strict=True):
        assert relative(a, b) < 1e-5


def test_it_draws_its_own_dropout_so_not_with_the_recomputed_one():
    with pytest.raises(ValueError, match=r"train\.lora\.recompute_dropout and train\.lora\.accumulate_in_place"):
        check_adapter_switches(LoraConfig(accumulate_in_place=True, recompute_dropout=True))


@needs_cuda
@pytest.mark.parametrize("fan_in, fan_out", [(3584, 3584), (18944, 3584), (3584, 18944)])
def test_on_cuda_at_the_7b_shapes_it_equals_peft_with_the_same_masks(fan_in, fan_out):
    """bf16 autocast, 2,432 tokens (a micro-batch of 4 of the bench's samples), the recipe's dropout 0.01: torch's
    fused dropout kernel draws the masks in both, so peft's and these are the same masks."""
    model = projection(fan_in, fan_out, 0.01, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(2432, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2432, fan_out, device="cuda", dtype=torch.bfloat16)
    peft, ours = (forward_backward(model, x, grad, accumulate, autocast=True) for accumulate in (False, True))
    for name, a, b in zip(("output", "lora_A", "lora_B", "input"), ours, peft, strict=True):
        assert relative(a, b) < 1e-2, (name, relative(a, b))
    other_masks = forward_backward(model, x, grad, True, autocast=True, seed=6)
    assert relative(other_masks[1], peft[1]) > 1e-2  # lora_A's gradient follows the masks


@pytest.mark.slow
def test_a_run_with_the_switch_logs_peft_losses_through_a_merge(e2e_workdir, e2e_overrides, run_trainer):
    """python -m trainer with train.lora.accumulate_in_place, LoRA dropout 0.3: a first run of two steps and a second
    after its merge (the switch applied again to the new adapters) draw peft's masks and log the losses of the run
    without the switch (each anchor's too; fp32 sums in another order), and export."""
    import json

    stages = ("train.stages=[{name: understanding, steps: 2, merge_after: true}, "
              "{name: generation, steps: 1, merge_after: true}]")

    def logged(name: str, *extra: str) -> list[dict]:
        run_trainer(["--config", "configs/tiny.yaml", *e2e_overrides(e2e_workdir, name), stages, "train.save_every=0",
                     "train.lora.dropout=0.3", *extra])
        assert (e2e_workdir / name / "final" / "config.json").is_file()
        return [json.loads(line) for line in (e2e_workdir / name / "metrics.jsonl").read_text().splitlines()]

    peft = logged("adapters-peft")
    ours = logged("adapters-accumulated", "train.lora.accumulate_in_place=true")
    assert [row["step"] for row in ours] == [1, 2, 3] and all({"loss", "sam"} <= set(row) for row in ours)
    for a, b in zip(ours, peft, strict=True):
        for key in ("loss", "text", "sam", "depth", "dino", "grad_norm"):  # grad_norm: B's gradients follow the masks
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
