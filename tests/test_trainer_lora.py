"""LoRA on the tiny Qwen2.5-VL: targets, trainable token rows, merge == base + LoRA."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from covt.config import LoraConfig
from trainer.lora import attach_lora, merge_lora, merged_token_rows, use_separate_token_rows
from trainer.tiny_model import build_tiny_base_model

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_base_model(tmp_path_factory.mktemp("lora") / "base", seed=0, image_size=112)


def load_with_new_rows(base_dir):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + NEW_TOKENS, mean_resizing=False)
    return model.eval(), list(range(old, old + NEW_TOKENS))


def image_inputs(base_dir, new_ids):
    processor = AutoProcessor.from_pretrained(base_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    # the new rows are not in this tokenizer yet: append their ids to every per-token tensor
    extra = torch.tensor([new_ids])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = 1 if key == "attention_mask" else 0
            inputs[key] = torch.cat([inputs[key], torch.full_like(extra, fill)], dim=1)
    return inputs


def randomise_adapters(model, seed=1):
    """Fresh LoRA has B = 0 (a no-op); give every trainable tensor a random value so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_modules(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))


def test_lora_goes_on_every_llm_and_vision_tower_linear_including_the_merger_and_nowhere_else(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    cfg = vlm.config
    linears = sorted(n for n, m in vlm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    peft_model = attach_lora(vlm, LoraConfig(), new_ids)
    names = lora_modules(peft_model)
    llm = [n for n in names if ".language_model.layers." in n]
    vision = [n for n in names if ".visual.blocks." in n]
    merger = [n for n in names if ".visual.merger." in n]
    assert len(llm) == cfg.text_config.num_hidden_layers * 7
    assert len(vision) == cfg.vision_config.depth * 5
    assert merger == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    assert len(names) == len(llm) + len(vision) + len(merger)  # no patch_embed.proj (Conv3d), lm_head
    assert {n.rsplit(".", 1)[1] for n in vision} == {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert names == linears  # the reference's rule: every Linear but the lm_head (and the heads, not in the VLM)


def test_the_merger_can_be_left_without_lora(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    names = lora_modules(attach_lora(vlm, LoraConfig(merger=False), new_ids))
    assert names and not any(".merger." in n for n in names)


def test_without_vision_tower_only_the_llm_gets_lora(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    names = lora_modules(attach_lora(vlm, LoraConfig(vision_tower=False), new_ids))
    assert names and all(".language_model.layers." in n for n in names)


def test_unknown_target_module_is_a_clear_error(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    with pytest.raises(ValueError, match=r"target_modules: \['c_attn'\]"):
        attach_lora(vlm, LoraConfig(target_modules=["q_proj", "c_attn"]), new_ids)


def test_only_adapters_and_new_token_rows_train(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    peft_model = attach_lora(vlm, LoraConfig(), new_ids)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = [n for n in trainable if "trainable_tokens_delta" in n]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    # untied Qwen2.5-VL: the new rows of both the input embedding and the lm_head
    assert len(rows) == 2 and all(trainable[n].shape == (NEW_TOKENS, vlm.config.text_config.hidden_size) for n in rows)
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_merged_weights_give_the_same_logits_as_base_plus_lora(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    with torch.no_grad():
        base_logits = vlm(**inputs).logits
    peft_model = attach_lora(vlm, LoraConfig(), new_ids).eval()
    randomise_adapters(peft_model)
    with torch.no_grad():
        lora_logits = peft_model(**inputs).logits
        merged = merge_lora(peft_model)
        merged_logits = merged(**inputs).logits
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters really change the output
    # fp32 throughout; merging only reassociates W x + B(A x) into (W + BA) x, so the
    # difference is float rounding (~1e-6 relative) accumulated over a few layers.
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=1e-4)


def test_merged_model_saves_and_reloads_with_plain_transformers(base_dir, tmp_path):
    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    peft_model = attach_lora(vlm, LoraConfig(), new_ids).eval()
    randomise_adapters(peft_model, seed=2)
    merged = merge_lora(peft_model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, merged(**inputs).logits, atol=0, rtol=0)


def test_new_lora_on_a_merged_model_starts_from_the_merged_weights(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    first = attach_lora(vlm, LoraConfig(), new_ids).eval()
    randomise_adapters(first, seed=3)
    merged = merge_lora(first)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
        second = attach_lora(merged, LoraConfig(), new_ids).eval()  # LoRA B starts at zero
        torch.testing.assert_close(second(**inputs).logits, merged_logits, atol=1e-6, rtol=1e-6)


def test_full_parameter_training_makes_every_parameter_trainable_and_merge_a_no_op(base_dir):
    vlm, new_ids = load_with_new_rows(base_dir)
    vlm.requires_grad_(False)
    model = attach_lora(vlm, LoraConfig(enabled=False), new_ids)
    assert model is vlm and not lora_modules(model)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert merge_lora(model) is model


@pytest.mark.slow
def test_full_parameter_run_trains_every_weight_and_merges_to_a_plain_folder(e2e_workdir, e2e_overrides,
                                                                             run_trainer):
    from safetensors.torch import load_file

    stages = "[{name: understanding, steps: 2, merge_after: true}]"
    run_trainer(["--config", "configs/tiny.yaml", *e2e_overrides(e2e_workdir, "full_parameter"),
                 f"train.stages={stages}", "train.lora.enabled=false", "train.save_every=0"])
    merged = e2e_workdir / "full_parameter" / "lora_stage1_merged"
    before, after = load_file(e2e_workdir / "base" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert not any("lora" in name for name in after)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    # the vision tower's patch embedding, an LLM norm and the old rows of lm_head: none of them trains with LoRA
    for name in ("visual.patch_embed.proj.weight", "model.norm.weight", "lm_head.weight"):
        assert name in changed, name
    assert len(changed) == len(before)  # every weight trained
    assert after["lm_head.weight"].dtype == before["lm_head.weight"].dtype
    Qwen2_5_VLForConditionalGeneration.from_pretrained(e2e_workdir / "full_parameter" / "final")


def bf16_step(base_dir, fp32_inputs: bool):
    """Loss, the trainable tensors' gradients and the fp32 casts of one autocast-bf16 forward/backward of a bf16
    base with fp32 adapters (the trainer's plain path), dropout off."""

    class CountFp32Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func) == "aten._to_copy.default" and out.dtype == torch.float32 \
                    and args[0].dtype == torch.bfloat16:
                self.elements += out.numel()
            return out

    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    model = attach_lora(vlm.to(torch.bfloat16), LoraConfig(dropout=0.0, fp32_inputs=fp32_inputs), new_ids)
    randomise_adapters(model)
    casts = CountFp32Casts()
    with casts, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).logits.float().pow(2).mean()
        loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, casts.elements


def test_adapters_on_bf16_inputs_give_the_same_loss_and_gradients_without_the_fp32_copies(base_dir):
    loss, grads, cast_on = bf16_step(base_dir, fp32_inputs=True)
    loss_off, grads_off, cast_off = bf16_step(base_dir, fp32_inputs=False)
    assert loss_off == loss  # the matmuls see the same bf16 values either way
    for name, g in grads.items():
        # the backward through peft's casts accumulates in the other dtype: within bf16 rounding
        torch.testing.assert_close(grads_off[name], g, rtol=1.6e-2, atol=1e-5, msg=name)
    assert cast_off < 0.6 * cast_on, (cast_off, cast_on)  # the adapters' casts were ~half (norms, rope keep theirs)


class OutputsShaped(TorchDispatchMode):
    """Counts the operators' outputs of one shape while active (views are not counted: they copy nothing)."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            self.count += isinstance(t, torch.Tensor) and t.shape == self.shape and not func.is_view
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_separate_token_rows_give_peft_own_outputs_and_gradients_without_the_whole_matrix(base_dir, tied):
    """lora.separate_token_rows: the thought-token rows' embeddings and logit columns computed apart from the frozen
    matrices give what peft's merged copy gives (embeddings exactly, logits and gradients within fp32 product
    rounding), and no operator makes a tensor the size of the embedding matrix (peft's copy and its gradient);
    switched off, peft's own path runs, with the row index made once per device."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    vlm, new_ids = load_with_new_rows(base_dir)
    if tied:
        vlm.config.tie_word_embeddings = True
        vlm.tie_weights()
    inputs = image_inputs(base_dir, new_ids)
    peft_model = attach_lora(vlm, LoraConfig(separate_token_rows=True), new_ids).eval()  # eval: no dropout
    randomise_adapters(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, TrainableTokensLayer)]
    assert len(layers) == 2 and all(layer.rows_apart for layer in layers)
    rows = [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]
    matrix = vlm.get_input_embeddings().weight.shape

    def logits_and_row_gradients():
        peft_model.zero_grad(set_to_none=True)
        with OutputsShaped(matrix) as copies:
            logits = peft_model(**inputs).logits
            (logits[0, -NEW_TOKENS:].square().sum() + logits[0, :, new_ids].sum()).backward()
        return logits.detach(), [p.grad.clone() for p in rows], copies.count

    ours = logits_and_row_gradients()
    assert use_separate_token_rows(peft_model, False) == 2
    theirs = logits_and_row_gradients()
    # peft's path copies each matrix and makes each one's gradient; this one makes no tensor of that shape
    assert ours[2] == 0 and theirs[2] >= 4, (ours[2], theirs[2])
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in ours[1])  # the rows train through the new forward
    for mine, peft_grad in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, peft_grad, rtol=1e-5, atol=1e-6)
    for layer in layers:  # the path switched off is peft's own, with its index kept on the device
        assert torch.equal(merged_token_rows(layer, layer.active_adapters),
                           TrainableTokensLayer.get_merged_weights(layer, layer.active_adapters))
    embedding = layers[0] if isinstance(layers[0].base_layer, torch.nn.Embedding) else layers[1]
    ids = inputs["input_ids"]
    use_separate_token_rows(peft_model, True)
    with torch.no_grad():  # the embeddings themselves: bit for bit
        torch.testing.assert_close(embedding(ids), torch.nn.functional.embedding(
            ids, merged_token_rows(embedding, embedding.active_adapters)), rtol=0, atol=0)


def dropout_step(base_dir, seed: int = 5, **switches):
    """One training forward and backward of the tiny VLM with LoRA dropout 0.3 and these ``train.lora`` switches
    (fp32, the CPU): loss, gradients, the bytes of the distinct storages autograd keeps for the backward pass, and
    the model."""
    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    model = attach_lora(vlm, LoraConfig(dropout=0.3, **switches), new_ids).train()
    randomise_adapters(model)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, sum(kept.values()), model


def test_recomputed_adapter_dropout_gives_the_same_loss_and_gradients_and_keeps_less(base_dir):
    """train.lora.recompute_dropout: the same dropout masks (the random state restored in the backward pass), so the
    same loss and gradients bit for bit, without each adapter's dropped copy of its input and its mask."""
    loss, grads, kept, plain = dropout_step(base_dir, recompute_dropout=False)
    loss_r, grads_r, kept_r, model = dropout_step(base_dir, recompute_dropout=True)
    assert loss_r == loss
    assert grads_r.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=0, atol=0, msg=name)
    assert kept_r < 0.9 * kept, (kept_r, kept)  # 0.84 on this model in fp32
    assert dropout_step(base_dir, seed=6, recompute_dropout=True)[0] != loss_r  # the masks do change with the seed
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and merging see the same tensors


def test_recomputed_adapter_dropout_switches_back_and_drops_nothing_in_eval(base_dir):
    from trainer.lora import DropoutThenLinear, adapter_layers, replace_adapter_dropout

    vlm, new_ids = load_with_new_rows(base_dir)
    inputs = image_inputs(base_dir, new_ids)
    model = attach_lora(vlm, LoraConfig(dropout=0.3, recompute_dropout=True), new_ids)
    randomise_adapters(model)
    layers = adapter_layers(model)
    dropouts = lambda: [m for layer in layers if hasattr(layer, "lora_dropout") for m in layer.lora_dropout.values()]  # noqa: E731
    adapters = len(lora_modules(model))
    assert len(dropouts()) == adapters and all(isinstance(m, torch.nn.Identity) for m in dropouts())
    with torch.no_grad():
        recomputed = model.eval()(**inputs).logits
        assert replace_adapter_dropout(layers, False) == adapters
        assert all(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in dropouts())
        assert all(type(a) is torch.nn.Linear for layer in layers for a in getattr(layer, "lora_A", {}).values())
        torch.testing.assert_close(model(**inputs).logits, recomputed, rtol=0, atol=0)  # eval: no dropout either way
    assert replace_adapter_dropout(layers, True) == adapters
    assert replace_adapter_dropout(layers, True) == 0  # switched once
    assert sum(type(a) is DropoutThenLinear for layer in layers for a in getattr(layer, "lora_A", {}).values()
               ) == adapters


def test_recomputed_adapter_dropout_compiles_to_the_same_gradients():
    """Under torch.compile (train.compile's blocks) the recomputed dropout draws the compiled code's masks again:
    the same output and gradients as the compiled code without it."""
    from tests.compiled import lora_block
    from trainer.lora import adapter_layers, replace_adapter_dropout

    def run(recompute: bool):
        torch.manual_seed(0)
        model = lora_block(dropout=0.3)
        replaced = replace_adapter_dropout(adapter_layers(model), recompute)
        assert replaced == 3 * recompute
        torch.manual_seed(1)
        x = torch.randn(20, 32, requires_grad=True)
        y = torch.compile(model)(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
def test_a_run_with_recomputed_adapter_dropout_logs_the_same_losses(e2e_workdir, e2e_overrides, run_trainer):
    """python -m trainer with train.lora.recompute_dropout, inside the model's own activation checkpointing as well:
    two steps log the same losses (each anchor's too) and gradient norms, bit for bit, as the run that keeps the
    dropped inputs."""
    import json

    def logged(name: str, *extra: str) -> list[dict]:
        run_trainer(["--config", "configs/tiny.yaml", *e2e_overrides(e2e_workdir, name),
                     "train.stages=[{name: understanding, steps: 2, merge_after: true}]", "train.save_every=0",
                     "train.gradient_checkpointing=true", "train.lora.dropout=0.3", *extra])
        return [json.loads(line) for line in (e2e_workdir / name / "metrics.jsonl").read_text().splitlines()]

    kept = logged("dropout-kept")
    assert [row["step"] for row in kept] == [1, 2] and all({"loss", "grad_norm", "sam"} <= set(row) for row in kept)
    assert logged("dropout-recomputed", "train.lora.recompute_dropout=true") == kept
