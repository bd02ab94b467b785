"""The reference's recipe: the 7B configs, the optimizer groups, the per-run schedule, --print-config."""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from covt.config import LoraConfig, TrainConfig, config_yaml, load_config, save_config
from trainer.lora import attach_lora
from trainer.optim import learning_rates, make_optimizer, make_scheduler, param_groups, untouched_row_shrink
from trainer.settings import RunSettings, grad_accum_for
from trainer.tiny_model import build_tiny_base_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["covt_7b_sam_depth_dino.yaml", "covt_7b_all.yaml"]


# ------------------------------------------------------------------------------- the 7B configs
@pytest.mark.parametrize("name", RECIPES)
def test_run_settings_are_derived_once_and_leave_the_config_as_loaded(name):
    """grad_accum from train.global_batch and what train.thoughts=false switches off are resolved into a frozen
    object; the config (saved as output_dir/config.yaml) stays what the user asked for."""
    cfg = load_config(REPO / "configs" / name, ["train.thoughts=false"])
    as_loaded = config_yaml(cfg)
    settings = RunSettings.resolve(cfg, world=2)
    assert cfg.train.batch_size == 2 and settings.grad_accum == 2 and cfg.train.grad_accum == 1  # 8 = 2 x 2 x 2 GPUs
    assert settings.head_anchors == () and not settings.anchor_losses and settings.batch.plain_only
    assert [s.anchor_losses for s in settings.stages] == [False] * 4 and all(s.anchor_losses for s in cfg.train.stages)
    assert config_yaml(cfg) == as_loaded
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grad_accum = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", RECIPES)
def test_the_7b_configs_are_the_reference_recipe(name):
    cfg = load_config(REPO / "configs" / name)
    t = cfg.train
    # finetune.sh: stage 1 for 6000 steps, merge; stages 2/3/4 as one run of 10000 steps, text only from 8000, merge
    assert [(s.name, s.steps, s.anchor_losses_off_from, s.merge_after) for s in t.stages] == [
        ("understanding", 6000, None, True), ("generation", 3000, None, False), ("reasoning", 3000, None, False),
        ("efficient_reasoning", 4000, 8000, True)]
    # run.sh
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.vision_tower, t.lora.merger) == (16, 32, 0.01, True, True)
    assert t.lora.target_modules == LoraConfig().target_modules
    assert (t.lr, t.projection_lr, t.weight_decay, t.warmup_ratio) == (5e-5, 1e-5, 0.1, 0.05)
    # global batch 8 (the reference's 8 GPUs x 1), kept on 1, 2 and 4 GPUs by the accumulation it sets
    assert t.global_batch == 8
    assert all(t.batch_size * grad_accum_for(t, gpus) * gpus == 8 for gpus in (1, 2, 4))
    assert t.plain_answer_fraction == pytest.approx(1 / 6)
    # activation checkpointing (the reference's) changes memory and time, not the maths: off, the faster (issue 9)
    assert (cfg.model.image_size, t.bf16) == (448, True)
    # the speed switches the device measured as wins (BENCHMARKS.md, issue 19): compiled blocks, bf16 adapter inputs,
    # fused AdamW, the SAM head's matching on the device; SAM's compiled prompt decoding with the folded attention
    # and its compiled encoder
    assert t.compile and not t.lora.fp32_inputs and t.optim == "adamw_torch_fused" and t.sam_matching == "device"
    assert cfg.precompute.sam.compile_decoder and cfg.precompute.sam.decoder_attention == "folded"
    assert cfg.precompute.sam.compile_encoder
    if "siglip" in cfg.anchors:
        assert Path(cfg.precompute.checkpoints["siglip"].path).name == "siglip2-large-patch16-256"
    assert cfg.anchors == (["sam", "depth", "dino"] if "sam_depth_dino" in name else
                           ["sam", "depth", "dino", "pidinet", "siglip", "metaclip"])


# ------------------------------------------------------------------------------- --print-config
def test_print_config_prints_the_resolved_config_as_yaml_that_loads_back(tmp_path):
    args = ["--config", "configs/covt_7b_all.yaml", "train.seed=7", "train.lr=1e-4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args, "--print-config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = load_config(REPO / "configs/covt_7b_all.yaml", ["train.seed=7", "train.lr=1e-4"])
    assert proc.stdout == config_yaml(expected)
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert load_config(printed) == expected
    assert "projection_lr: 1.0e-05" in proc.stdout and "seed: 7" in proc.stdout  # defaults and overrides resolved


def test_save_config_writes_a_file_that_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", ["anchors=[sam,depth]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path == tmp_path / "run" / "config.yaml" and load_config(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


# ------------------------------------------------------------------------------- optimizer groups
class Heads(torch.nn.Module):
    """Parameters named like the reference's heads: projection, queries, attention, a generator, a norm."""

    def __init__(self):
        super().__init__()
        self.sam_projection = torch.nn.Linear(8, 4)
        self.sam_query_vectors = torch.nn.Parameter(torch.zeros(2, 4))
        self.sam_cross_attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.depth_token_generator = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
        self.norm = torch.nn.LayerNorm(4)
        self.frozen_decoder = torch.nn.Linear(4, 4).requires_grad_(False)


@pytest.fixture(scope="module")
def covt_like(tmp_path_factory):
    base = build_tiny_base_model(tmp_path_factory.mktemp("optim") / "base", seed=0, image_size=112)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    rows = vlm.get_input_embeddings().weight.shape[0]
    vlm.resize_token_embeddings(rows + 2, mean_resizing=False)
    model = torch.nn.Module()
    model.vlm = attach_lora(vlm, LoraConfig(), [rows, rows + 1])
    model.heads = Heads()
    return model


def test_param_groups_follow_the_reference_rule(covt_like):
    t = TrainConfig()
    groups = param_groups(covt_like, t)
    name_of = {id(p): n for n, p in covt_like.named_parameters()}
    by_group = {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}
    trainable = {n for n, p in covt_like.named_parameters() if p.requires_grad}
    assert sorted(n for names in by_group.values() for n in names) == sorted(trainable)  # each once, frozen out
    projection = by_group["projection"] | by_group["projection_no_decay"]
    assert projection == {n for n in trainable if n.startswith(("heads.sam_projection", "heads.sam_query_vectors",
                                                                "heads.sam_cross_attention"))}
    assert not any(n.startswith("heads.depth_token_generator") for n in projection)  # stays at lr
    no_decay = by_group["main_no_decay"] | by_group["projection_no_decay"]
    assert no_decay == {n for n in trainable if n.endswith("bias") or n.startswith("heads.norm.")}
    assert any("lora_A" in n for n in by_group["main"]) and any("trainable_tokens_delta" in n for n in by_group["main"])
    for g in groups:
        assert g["lr"] == (t.projection_lr if g["name"].startswith("projection") else t.lr)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else t.weight_decay)
    assert set(learning_rates(make_optimizer(covt_like, t))) == {"lr", "projection_lr"}


def test_only_the_new_rows_of_embed_tokens_and_lm_head_change_and_they_decay(covt_like):
    vlm = covt_like.vlm
    embed, head = vlm.get_input_embeddings(), vlm.get_output_embeddings()
    before = [embed.weight.detach().clone(), head.weight.detach().clone()]
    optimizer = make_optimizer(covt_like, TrainConfig(lr=1e-2, weight_decay=0.1))
    for p in covt_like.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a parameter
    deltas = [p for n, p in covt_like.named_parameters() if "trainable_tokens_delta" in n]
    old_deltas = [d.detach().clone() for d in deltas]
    optimizer.step()
    after = [embed.weight.detach(), head.weight.detach()]
    old_rows = before[0].shape[0] - 2
    for b, a in zip(before, after):
        assert torch.equal(b[:old_rows], a[:old_rows])  # the base rows are not optimizer parameters at all
        assert not torch.equal(b[old_rows:], a[old_rows:])
    for old, new in zip(old_deltas, deltas):
        torch.testing.assert_close(new.detach(), old * (1 - 1e-2 * 0.1))  # the new rows decay as in the reference


# ------------------------------------------------------------------------------- the schedule
def test_schedule_is_warmup_then_cosine_to_zero_over_each_run():
    run_steps, lr = 6000, 5e-5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer, run_steps, 0.05)
    seen = []
    for _ in range(run_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = math.ceil(0.05 * run_steps)
    assert seen[0] == 0.0 and seen[warmup // 2] == pytest.approx(lr / 2) and seen[warmup] == pytest.approx(lr)
    mid = warmup + (run_steps - warmup) // 2
    assert seen[mid] == pytest.approx(lr / 2, rel=1e-3)
    assert seen[-1] == pytest.approx(0.0, abs=lr * 1e-6) and optimizer.param_groups[0]["lr"] == 0.0


def test_the_reference_decays_untouched_rows_by_a_measured_few_percent():
    # the reference's AdamW shrinks every row with no gradient by prod(1 - lr_t * wd) per run
    run1 = untouched_row_shrink(6000, 5e-5, 0.1, 0.05)
    run2 = untouched_row_shrink(10000, 5e-5, 0.1, 0.05)
    # about exp(-wd * sum lr_t) = exp(-0.1 * 5e-5 * (0.5 * warmup + 0.5 * (steps - warmup)))
    for shrink, steps in ((run1, 6000), (run2, 10000)):
        assert shrink == pytest.approx(math.exp(-0.1 * 5e-5 * steps / 2), rel=1e-4)
    assert 1 - run1 * run2 == pytest.approx(0.0392, abs=5e-4)  # 3.9% over the recipe (README)
