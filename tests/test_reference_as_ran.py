"""The reference as its code runs (README, "Differences from the reference"): the 7B configs choose the
reference's behaviour for every item of the audit, each switch does what it says, and the README's override set
gives the evident intent back."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from covt.config import LoraConfig, TrainConfig, config_yaml, load_config
from trainer.batch import sample_text, truncation_point
from trainer.heads import CacheDims
from trainer.lora import attach_lora, stop_token_row_gradients
from trainer.optim import make_optimizer
from trainer.schedule import Schedule
from trainer.settings import BatchSettings, RunSettings
from trainer.tiny_model import build_tiny_base_model
from trainer.train import build_job_heads, clip_norm, deepspeed_config, finish_step, run_stream

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["covt_7b_sam_depth_dino.yaml", "covt_7b_all.yaml"]
# dotted key -> the reference's behaviour as its code runs (the 7B configs' value)
AS_RAN = {
    "train.max_grad_norm": None,
    "train.new_token_rows": "first_run",
    "train.trained_head_parameters": "projection_query_attention",
    "train.head_init": "transformers",
    "train.stage4_draws": "per_step",
    "train.data_order": "restart_each_run",
    "train.max_length": None,
    "train.lr_scheduler": "cosine",
    "precompute.dtype": "fp32",
    "precompute.sam.points_per_side": 32,
    "precompute.sam.pred_iou_thresh": 0.88,
    "precompute.sam.stability_score_thresh": 0.95,
    "precompute.sam.nms_score": "pred_iou",
}
HIDDEN = 16
DIMS = {"depth": {"layers": 4, "patches": 16, "dim": 8, "map_h": 8, "map_w": 8}, "dino": {"tokens": 5, "dim": 8}}


def value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# ------------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("name", RECIPES)
def test_the_7b_configs_reproduce_the_reference_as_it_ran_and_print_it(name):
    cfg = load_config(REPO / "configs" / name)
    assert {key: value(cfg, key) for key in AS_RAN} == AS_RAN
    printed = config_yaml(cfg)
    assert "lr_scheduler: cosine" in printed and "max_grad_norm: null" in printed and "max_length: null" in printed


@pytest.mark.parametrize("name", RECIPES)
def test_the_7b_configs_run_fp32_matrix_products_in_tf32_as_run_sh_does(name):
    """run.sh 69 passes --tf32 True: the training process, the anchors inside its step included, runs fp32 matrix
    products in TF32. use_tf32 sets that for this process (tf32_matmuls reads it back); False leaves it alone."""
    from covt.compute import tf32_matmuls, use_tf32

    cfg = load_config(REPO / "configs" / name)
    assert cfg.precompute.tf32 and cfg.train.tf32 and cfg.precompute.dtype == "fp32"
    assert not TrainConfig().tf32  # Hugging Face's default: PyTorch's own setting
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        use_tf32(False)
        assert matmul.fp32_precision == before
        use_tf32(True)
        assert tf32_matmuls() and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before
    assert tf32_matmuls() == (before == "tf32")


def test_the_readme_override_set_gives_the_evident_intent():
    readme = (REPO / "README.md").read_text()
    found = re.search(r"\*\*The evident intent\*\*[^`]*`([^`]+)`", readme)
    assert found, "README: the evident intent's override set is missing"
    overrides = found.group(1).split()
    intent = load_config(REPO / "configs/covt_7b_sam_depth_dino.yaml", overrides).train
    defaults = TrainConfig()
    train_keys = [k.split(".", 1)[1] for k in AS_RAN if k.startswith("train.") and k != "train.lr_scheduler"]
    assert {k: getattr(intent, k) for k in train_keys} == {k: getattr(defaults, k) for k in train_keys}
    assert intent.max_grad_norm == 1.0 and intent.max_length == 2048


# ------------------------------------------------------------------------------- 1. new-token rows
@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory) -> Path:
    return build_tiny_base_model(tmp_path_factory.mktemp("as_ran") / "base", seed=0, image_size=112)


def token_row_grads(path: Path, stop: bool) -> tuple[list[torch.nn.Parameter], torch.nn.Module]:
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    rows = vlm.get_input_embeddings().weight.shape[0]
    vlm.resize_token_embeddings(rows + 2, mean_resizing=False)
    model = attach_lora(vlm, LoraConfig(), [rows, rows + 1])
    if stop:
        assert stop_token_row_gradients(model) >= 1
    ids = torch.tensor([[1, rows, 5, rows + 1, 7, rows, 3]])
    model(input_ids=ids, labels=ids).loss.backward()
    return [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n], model


def test_after_the_first_merge_the_token_rows_get_no_gradient_and_only_decay(tiny_vlm_path):
    rows, _ = token_row_grads(tiny_vlm_path, stop=False)
    assert rows and any(p.grad.abs().sum() > 0 for p in rows)  # trained in the first run
    rows, _ = token_row_grads(tiny_vlm_path, stop=True)
    assert all(p.grad is not None and not p.grad.any() for p in rows)
    before = [p.detach().clone() for p in rows]
    optimizer = torch.optim.AdamW(rows, lr=0.1, weight_decay=0.1)
    optimizer.step()
    for p, b in zip(rows, before):  # AdamW's decoupled decay alone: the reference's masked rows
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.1))


# ------------------------------------------------------------------------------- 2, 4. the heads
def heads_model(tmp_path: Path, *overrides: str):
    cfg = load_config(REPO / "configs/tiny.yaml", ["anchors=[depth,dino]", *overrides])
    model = torch.nn.Module()
    model.heads = build_job_heads(cfg, RunSettings.resolve(cfg, 1), HIDDEN, CacheDims(DIMS, tmp_path), 0.02)
    return cfg, model


def heads_loss(heads) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    d = DIMS["depth"]
    depth = {"features": torch.randn(2, d["layers"], d["patches"], d["dim"], generator=g),
             "depth": torch.rand(2, d["map_h"], d["map_w"], generator=g)}
    dino = {"features": torch.randn(2, DIMS["dino"]["tokens"], DIMS["dino"]["dim"], generator=g)}
    return (heads["depth"](torch.randn(2, 4, HIDDEN, generator=g), depth)
            + heads["dino"](torch.randn(2, 4, HIDDEN, generator=g), dino))


@pytest.mark.parametrize("trained", ["projection_query_attention", "all"])
@pytest.mark.parametrize("init", ["transformers", "torch"])
def test_the_depth_mlp_stays_at_its_init_when_only_the_reference_names_train(tmp_path, trained, init):
    cfg, model = heads_model(tmp_path, f"train.trained_head_parameters={trained}", f"train.head_init={init}")
    torch.randn(3)  # the global generator moves between builds (a merge rebuilds the heads mid-run)
    mlp = model.heads["depth"].depth_token_generator
    # start, resume and merges rebuild it
    again = build_job_heads(cfg, RunSettings.resolve(cfg, 1), HIDDEN, CacheDims(DIMS, tmp_path), 0.02)
    for a, b in zip(mlp.parameters(), again["depth"].depth_token_generator.parameters()):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in mlp.parameters()]
    projection = model.heads["dino"].attend.thought_projection.weight.detach().clone()
    optimizer = make_optimizer(model, cfg.train)
    heads_loss(model.heads).backward()
    optimizer.step()
    unchanged = all(torch.equal(p, b) for p, b in zip(mlp.parameters(), before))
    assert unchanged == (trained == "projection_query_attention")
    assert not torch.equal(model.heads["dino"].attend.thought_projection.weight, projection)


def test_transformers_head_init_is_that_of_missing_keys(tmp_path):
    _, torch_init = heads_model(tmp_path, "train.head_init=torch")
    _, hf_init = heads_model(tmp_path, "train.head_init=transformers")
    linears = [m for m in hf_init.heads.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4  # depth MLP 2, dino projection, dino attention's out-projection
    for m in linears:
        assert not m.bias.any()
        assert abs(float(m.weight.detach().std()) - 0.02) < 0.006, m
    assert all(m.bias.any() for m in torch_init.heads.modules() if isinstance(m, torch.nn.Linear)
               and m.out_features > 1 and m is not torch_init.heads["dino"].attend.cross_attention.out_proj)
    # nn.MultiheadAttention's xavier in-projection and the randn queries are as built
    attention = hf_init.heads["dino"].attend.cross_attention
    bound = math.sqrt(6 / (attention.in_proj_weight.shape[0] + attention.in_proj_weight.shape[1]))
    assert float(attention.in_proj_weight.abs().max()) <= bound
    assert abs(float(hf_init.heads["dino"].attend.query_vectors.std()) - 1.0) < 0.5


# ------------------------------------------------------------------------------- 3. clipping
@pytest.mark.parametrize("max_grad_norm, norm_after", [(None, 10.0), (0.0, 10.0), (1.0, 1.0)])
def test_clipping_is_off_unless_max_grad_norm_is_set(max_grad_norm, norm_after):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 5.0)  # norm 10
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    t = TrainConfig(max_grad_norm=max_grad_norm)
    _, norm, applied = finish_step({"loss": torch.tensor(1.0)}, None, optimizer, scheduler, [p], clip_norm(t))
    assert applied and norm == pytest.approx(10.0)
    assert float(p.detach().norm()) == pytest.approx(norm_after)


def test_deepspeed_clips_as_max_grad_norm_says(tmp_path):
    t = TrainConfig(deepspeed=str(REPO / "configs/deepspeed/zero3.json"), max_grad_norm=None)
    assert deepspeed_config(t, 8, torch.device("cpu"))["gradient_clipping"] == math.inf  # computes the norm only
    t.max_grad_norm = 1.0
    assert deepspeed_config(t, 8, torch.device("cpu"))["gradient_clipping"] == 1.0
    other = tmp_path / "ds.json"
    other.write_text('{"gradient_clipping": 0.5}')
    with pytest.raises(ValueError, match="gradient_clipping is 0.5 but train.max_grad_norm is 1.0"):
        deepspeed_config(TrainConfig(deepspeed=str(other), max_grad_norm=1.0), 1, torch.device("cpu"))


# ------------------------------------------------------------------------------- 6. stage-4 draws
CONVERSATION = [{"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "Two cups."}]


@pytest.mark.parametrize("draws", ["per_step", "per_sample"])
def test_stage4_draws_are_shared_by_the_samples_of_a_step_when_per_step(draws):
    cfg = load_config(REPO / "configs/tiny.yaml", ["anchors=[sam,depth,dino]", f"train.stage4_draws={draws}"])
    shared = []
    for step in range(20):
        texts = {sample_text({"index": i, "conversations": CONVERSATION}, "efficient_reasoning", cfg.anchors, step,
                             BatchSettings.from_config(cfg)).labelled for i in range(8)}
        shared.append(len(texts) == 1)
    assert all(shared) == (draws == "per_step")


# ------------------------------------------------------------------------------- 7. data order
@pytest.mark.parametrize("order", ["restart_each_run", "continue"])
def test_each_run_rereads_the_stream_from_its_start_when_restart_each_run(synthetic_cache, order):
    cfg = load_config(REPO / "configs/tiny.yaml", [f"cache.dir={synthetic_cache}", "anchors=[sam,depth,dino]",
                                                   "train.batch_size=1", f"train.data_order={order}"])
    run0, run1 = Schedule(cfg.train.stages).runs
    per_step = cfg.train.batch_size * RunSettings.resolve(cfg, 1).grad_accum
    first, step0 = run_stream(cfg, per_step, 0, 1, run0.start, run0)
    second, step1 = run_stream(cfg, per_step, 0, 1, run1.start, run1)
    assert (step0, step1) == (0, run1.start if order == "restart_each_run" else 0)
    read = [[ds.index_at(p) for p, _ in zip(ds.positions(), range(3))] for ds in (first, second)]
    assert (read[0] == read[1]) == (order == "restart_each_run")
    resumed, _ = run_stream(cfg, per_step, 0, 1, run1.start + 2, run1)  # a resumed run continues where it was
    assert resumed.index_at(next(resumed.positions())) == second.index_at(second.start + 2)


# ------------------------------------------------------------------------------- 8. length
def test_max_length_null_never_truncates():
    assert load_config(REPO / "configs/tiny.yaml", ["train.max_length=null"]).train.max_length is None
    assert truncation_point(list(range(40000)), None, None, None, "sample 0") == 40000


# ------------------------------------------------------------------------------- 5. SAM's automatic masks
def test_sam_settings_default_to_sam_automatic_mask_generators_own():
    import inspect

    from segment_anything import SamAutomaticMaskGenerator

    from covt.config import SamPrecomputeConfig

    library = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    ours = SamPrecomputeConfig()
    for key in ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        assert getattr(ours, key) == library[key].default, key
    assert (ours.nms_score, ours.max_masks) == ("pred_iou", 8)


def test_sam_masks_are_the_ones_the_reference_keeps_from_the_librarys_generator(tmp_path):
    """On sample photos with the tiny SAM: segment_anything's own generator (NMS ranked by predicted IoU), then
    the reference's top 8 by predicted IoU x stability (covt_qwen2_5_vl.py 648-676), select the prompts ours
    selects. Thresholds low enough that the random tiny model proposes masks; stability is not thresholded
    (ours is computed on the low-res logits)."""
    from PIL import Image
    from segment_anything import SamAutomaticMaskGenerator

    from covt.images import square_view
    from precompute.anchors import load_anchor

    cfg = load_config(REPO / "configs/tiny.yaml", [f"precompute.checkpoints.sam.path={tmp_path}/sam.pth",
                                                   "precompute.sam.pred_iou_thresh=0.15",
                                                   "precompute.sam.stability_score_thresh=0.0"])
    sam = cfg.precompute.sam
    anchor = load_anchor("sam", cfg.precompute, torch.device("cpu"))
    photos = sorted((REPO / "data/sample/images").glob("*.jpg"))[:3]
    views = torch.from_numpy(np.stack([square_view(Image.open(p), anchor.input_size) for p in photos]))
    ours = anchor.automatic_masks(anchor.embed(views))
    generator = SamAutomaticMaskGenerator(anchor.sam, points_per_side=sam.points_per_side,
                                          pred_iou_thresh=sam.pred_iou_thresh,
                                          stability_score_thresh=sam.stability_score_thresh,
                                          box_nms_thresh=sam.box_nms_thresh)
    for i in range(len(photos)):
        kept = sorted(generator.generate(views[i].numpy()),
                      key=lambda m: m["predicted_iou"] * m["stability_score"], reverse=True)[:sam.max_masks]
        assert kept
        theirs = sorted((*np.round(m["point_coords"][0], 2), round(m["predicted_iou"], 3)) for m in kept)
        count = int(ours.count[i])
        mine = sorted((*np.round(ours.points[i, k].tolist(), 2), round(float(ours.iou[i, k]), 3))
                      for k in range(count))
        np.testing.assert_allclose(np.array(mine), np.array(theirs), atol=2e-3)


# ------------------------------------------------------------------------------- all of them, trained
def as_ran_overrides(workdir: Path, output: str, e2e_overrides) -> list[str]:
    as_ran = [f"{key}={'null' if v is None else v}" for key, v in AS_RAN.items() if key.startswith("train.")]
    return [*e2e_overrides(workdir, output), *as_ran]


@pytest.fixture(scope="module")
def trained_as_ran(e2e_workdir, e2e_overrides, run_trainer) -> Path:
    run_trainer(["--config", "configs/tiny.yaml", *as_ran_overrides(e2e_workdir, "as_ran", e2e_overrides)])
    return e2e_workdir / "as_ran"


@pytest.mark.slow
def test_the_tiny_run_trains_with_every_switch_as_the_reference_ran(e2e_workdir, e2e_overrides, trained_as_ran):
    """The whole schedule with the 7B configs' choices: the depth MLP leaves it exactly as it was built."""
    import json

    from safetensors.torch import load_file

    from shards.reader import Cache

    overrides = as_ran_overrides(e2e_workdir, "as_ran", e2e_overrides)
    final = trained_as_ran / "final"
    heads = load_file(final / "covt_heads.safetensors")
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    hidden = json.loads((final / "covt_heads.json").read_text())["hidden_size"]
    built = build_job_heads(cfg, RunSettings.resolve(cfg, 1), hidden, Cache(cfg.cache.dir), 0.02)
    for key, value in built["depth"].depth_token_generator.state_dict().items():
        assert torch.equal(heads[f"depth.depth_token_generator.{key}"], value), key
    assert not torch.equal(heads["dino.attend.query_vectors"], built["dino"].attend.query_vectors.detach())
    lines = [json.loads(line) for line in (trained_as_ran / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == Schedule(cfg.train.stages).total_steps and all(math.isfinite(x["loss"]) for x in lines)


@pytest.mark.slow
def test_resuming_mid_run_as_the_reference_ran_reproduces_the_uninterrupted_losses(e2e_workdir, e2e_overrides,
                                                                                 trained_as_ran):
    """Frozen heads rebuilt, the stream restarted per run and the draws per step survive a resume in run 2."""
    from trainer.train import train

    cfg = load_config(REPO / "configs/tiny.yaml", as_ran_overrides(e2e_workdir, "as_ran_split", e2e_overrides))
    assert train(cfg, stop_after=3) is None  # stops after the first merge, mid generation
    assert train(cfg) is not None
    split = e2e_workdir / "as_ran_split"
    assert (split / "metrics.jsonl").read_text() == (trained_as_ran / "metrics.jsonl").read_text()
