"""train.lora.split_k: the adapters' 16-wide products with their reductions in batched slices (trainer/split_k.py)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from covt.config import LoraConfig
from tests.compiled import lora_block, recompilations
from tests.test_trainer_lora import (
    base_dir,  # noqa: F401  (the module's tiny model fixture)
    image_inputs,
    load_with_new_rows,
    randomise_adapters,
)
from trainer import split_k
from trainer.lora import adapter_layers, attach_lora, use_split_k


class Calls(TorchDispatchMode):
    """Counts the calls of each operator while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("m", "k", "n", "slices"), [(608, 3584, 16, 14), (37, 300, 16, 8), (16, 4096, 5, 16),
                                                     (5, 16, 40, 8), (7, 33, 3, 1)])
def test_a_product_split_k_is_the_product(m, k, n, slices):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, m, dtype=torch.float64, generator=g).T  # a transposed operand, as autograd hands them over
    b = torch.randn(k, n, dtype=torch.float64, generator=g)
    torch.testing.assert_close(split_k.split_k_matmul(a, b, slices), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [1, 5, 8, 9, 16, 17, 608])
def test_a_product_split_over_the_tokens_is_the_product_for_any_token_count(tokens):
    """Over the tokens the rest always runs, 1 to 8 of them, the slices empty below 9 tokens."""
    g = torch.Generator().manual_seed(tokens)
    a = torch.randn(tokens, 16, dtype=torch.float64, generator=g).T  # the gradient at the rank side, transposed
    b = torch.randn(tokens, 48, dtype=torch.float64, generator=g)
    got = split_k.split_k_matmul(a, b, split_k.TOKEN_SLICES, tokens=True)
    torch.testing.assert_close(got, a @ b, rtol=1e-12, atol=1e-12)


def test_the_slice_counts_follow_the_reduction():
    assert split_k.slice_count(3584) == 14
    assert split_k.slice_count(18944) == split_k.MAX_SLICES
    assert split_k.slice_count(200) == 1
    assert split_k.width_slices(16, 3584) == (14, 1)  # lora_A: its forward is the thin product
    assert split_k.width_slices(18944, 16) == (1, split_k.MAX_SLICES)  # lora_B: its input gradient is
    assert split_k.width_slices(16, 16) == (1, 1)


def split_k_step(base_dir, monkeypatch, enabled: bool):  # noqa: F811
    """One training forward and backward of the tiny VLM in fp32 with dropout off; slices from 8 reduction
    elements, so that the tiny model's 64-128-wide layers split as the 7B's do."""
    monkeypatch.setattr(split_k, "MIN_SLICE", 8)
    vlm, new_ids = load_with_new_rows(base_dir)
    model = attach_lora(vlm, LoraConfig(dropout=0.0, split_k=enabled), new_ids).train()
    randomise_adapters(model)
    with Calls() as calls:
        loss = model(**image_inputs(base_dir, new_ids)).logits.float().pow(2).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, calls.counts.get("bmm", 0), model


def test_split_k_adapters_give_the_same_loss_and_gradients(base_dir, monkeypatch):  # noqa: F811
    loss, grads, bmm_plain, plain = split_k_step(base_dir, monkeypatch, False)
    loss_s, grads_s, bmm_split, model = split_k_step(base_dir, monkeypatch, True)
    adapters = sum(len(layer.lora_A) for layer in adapter_layers(model) if hasattr(layer, "lora_A"))
    # each adapter: lora_A's forward and weight gradient, lora_B's input and weight gradients
    assert bmm_split - bmm_plain == 4 * adapters, (bmm_split, bmm_plain, adapters)
    assert loss_s == pytest.approx(loss, rel=1e-6)
    assert grads_s.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and merging see the same tensors


def test_split_k_switches_back(base_dir):  # noqa: F811
    vlm, new_ids = load_with_new_rows(base_dir)
    model = attach_lora(vlm, LoraConfig(split_k=True), new_ids)
    layers = adapter_layers(model)
    linears = [linear for layer in layers if hasattr(layer, "lora_A")
               for linear in (*layer.lora_A.values(), *layer.lora_B.values())]
    assert linears and all(type(linear) is split_k.SplitKLinear for linear in linears)
    assert use_split_k(layers, True) == 0  # switched once
    assert use_split_k(layers, False) == len(linears)
    assert all(type(linear) is torch.nn.Linear for linear in linears)


def test_split_k_adapters_under_bf16_autocast_compute_in_bf16_and_train_fp32_weights(monkeypatch):
    monkeypatch.setattr(split_k, "MIN_SLICE", 8)
    layer = torch.nn.Linear(64, 16, bias=False)
    layer.__class__ = split_k.SplitKLinear
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10, 16)
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.linear(x, layer.weight)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)


def test_split_k_adapters_compile_to_the_same_gradients_for_any_token_count(monkeypatch):
    """Under torch.compile (train.compile's blocks), with the token count changing as micro-batches do: the same
    output and gradients as eager, and no recompilation past the one that makes the token count dynamic."""
    monkeypatch.setattr(split_k, "MIN_SLICE", 8)
    torch.manual_seed(0)
    model = lora_block(dropout=0.0)
    assert use_split_k(adapter_layers(model), True) == 6
    torch.compiler.reset()
    compiled = torch.compile(model)
    with recompilations() as recompiles:
        compare_for_token_counts(model, compiled)
    assert len(recompiles) == 1, recompiles  # 37 after 20 makes the token count dynamic; 64 and 51 then reuse it


def compare_for_token_counts(model, compiled) -> None:
    for tokens in (20, 37, 64, 51):
        results = []
        for run in (compiled, model):
            model.zero_grad(set_to_none=True)
            x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens), requires_grad=True)
            y = run(x)
            y.square().sum().backward()
            results.append([y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_split_k_with_the_recomputed_dropout_splits_its_product_and_draws_the_same_masks(base_dir, monkeypatch):  # noqa: F811
    """lora.split_k with lora.recompute_dropout: lora_A keeps the class that drops out its own input and splits its
    product; the masks are the recomputed dropout's, so loss and gradients equal it without the split up to the
    sums' order. Either switch turns back on its own."""
    from tests.test_trainer_lora import dropout_step
    from trainer.lora import DropoutThenLinear, replace_adapter_dropout

    monkeypatch.setattr(split_k, "MIN_SLICE", 8)
    loss, grads, _, _ = dropout_step(base_dir, recompute_dropout=True)
    with Calls() as calls:
        loss_s, grads_s, _, model = dropout_step(base_dir, recompute_dropout=True, split_k=True)
    assert calls.counts.get("bmm", 0) > 0
    assert loss_s == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-7, msg=name)
    layers = [layer for layer in adapter_layers(model) if hasattr(layer, "lora_A")]
    kinds = lambda side: {type(m) for layer in layers for m in getattr(layer, side).values()}  # noqa: E731
    assert kinds("lora_A") == {DropoutThenLinear} and kinds("lora_B") == {split_k.SplitKLinear}
    assert all(a.split_k for layer in layers for a in layer.lora_A.values())
    assert replace_adapter_dropout(layers, False) == len(layers)
    assert kinds("lora_A") == {split_k.SplitKLinear}  # still split-K, dropout back in peft's module
    assert replace_adapter_dropout(layers, True) == len(layers) and use_split_k(layers, False) == 2 * len(layers)
    assert kinds("lora_A") == {DropoutThenLinear} and kinds("lora_B") == {torch.nn.Linear}
    assert not any(a.split_k for layer in layers for a in layer.lora_A.values())
