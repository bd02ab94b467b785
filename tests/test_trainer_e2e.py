"""The whole recipe on the tiny model (CPU): stages, merges, exact resume, the final folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covt.config import load_config

REPO = Path(__file__).resolve().parents[1]
ANCHORS = ["sam", "depth", "dino"]  # the paper's main model; the other heads are covered by test_heads

pytestmark = pytest.mark.slow


# the trained tiny run is built once per session in conftest.py (e2e_workdir, e2e_trained, e2e_overrides),
# so tests of what uses a trained model (test_trainer_use.py) reuse it instead of training again
@pytest.fixture(scope="module")
def workdir(e2e_workdir):
    return e2e_workdir


@pytest.fixture(scope="module")
def overrides(e2e_overrides):
    return e2e_overrides


@pytest.fixture(scope="module")
def uninterrupted(e2e_trained):
    return e2e_trained


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_stage_runs_in_order_with_its_anchor_losses(uninterrupted):
    rows = metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == ["understanding"] * 2 + ["generation"] * 2 + ["reasoning"] + \
        ["efficient_reasoning"] * 2
    assert [r["run"] for r in rows] == [0, 0, 1, 1, 1, 1, 1]
    assert [r["anchor_losses"] for r in rows] == [True] * 6 + [False]
    for r in rows[:6]:
        if r["stage"] != "efficient_reasoning":  # stage 4 samples a subset of anchors per sample
            assert set(ANCHORS) <= set(r)
    assert set(rows[6]) & set(ANCHORS) == set() and rows[6]["loss"] == rows[6]["text"]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_the_run_folder_keeps_the_resolved_config(uninterrupted, workdir, overrides):
    saved = load_config(uninterrupted / "config.yaml")
    assert saved == load_config(REPO / "configs/tiny.yaml", overrides(workdir, "full"))
    assert saved.train.output_dir == str(workdir / "full")


def test_each_run_has_its_own_warmup_and_cosine_schedule(uninterrupted):
    # run 0: 2 steps (warm-up 1), run 1: 5 steps (warm-up 1); the logged lr is the next step's
    lrs = [r["lr"] for r in metrics(uninterrupted)]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(0.0, abs=1e-12)  # run 0 ends at 0
    assert lrs[2] == pytest.approx(5e-3)  # run 1 starts a fresh schedule after the merge
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # the heads' projections, queries and attention (when the heads have such names) follow the same schedule
    assert [r.get("projection_lr", r["lr"]) for r in metrics(uninterrupted)] == pytest.approx(lrs)


def test_both_merges_and_tensorboard_are_written(uninterrupted):
    for name in ("lora_stage1_merged", "lora_stage234_merged"):
        assert (uninterrupted / name / "config.json").is_file()
        assert (uninterrupted / name / "tokenizer.json").is_file()
    assert any((uninterrupted / "tb").iterdir())
    steps = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert steps == ["step-000006", "step-000007"]  # the last two of 2, 3, 4, 5, 6 (save_every), 7


def test_every_optimizer_step_records_its_time(uninterrupted):
    perf = [json.loads(line) for line in (uninterrupted / "perf-rank0.jsonl").read_text().splitlines()]
    assert [p["step"] for p in perf] == [r["step"] for r in metrics(uninterrupted)]
    assert all(p["seconds"] > 0 for p in perf)
    # the samples' own tokens of each step, and the share of the micro-batches' tokens that pad
    assert all(p["tokens"] > 0 and 0 <= p["padding_fraction"] < 1 for p in perf)


def test_final_folder_loads_with_plain_transformers_and_generates(uninterrupted):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from trainer.loading import load_covt_heads
    from trainer.tokens import pad_token, thought_text

    final = uninterrupted / "final"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    meta = json.loads((final / "covt_heads.json").read_text())
    assert meta["anchors"] == ANCHORS
    for anchor in ANCHORS:
        token_id = meta["tokens"]["pads"][anchor]["id"]
        assert processor.tokenizer.convert_ids_to_tokens(token_id) == pad_token(anchor)
        assert token_id < model.get_input_embeddings().weight.shape[0]
        # a visual thought survives encode -> decode as the special tokens themselves
        ids = processor.tokenizer(thought_text(anchor), add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(ids) == thought_text(anchor)

    image = Image.open(REPO / "data/sample/images" / sorted(os.listdir(REPO / "data/sample/images"))[0]).convert("RGB")
    question = {"type": "text", "text": "What is the depth map of the image?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image.resize((112, 112))], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0], str)

    heads = load_covt_heads(final)
    assert list(heads.keys()) == ANCHORS
    from safetensors.torch import load_file

    last = load_file(uninterrupted / "checkpoints" / "step-000007" / "trainable.safetensors")
    for name, value in heads.state_dict().items():
        if f"heads.{name}" in last:
            torch.testing.assert_close(value, last[f"heads.{name}"], atol=0, rtol=0)


def test_resume_mid_stage_and_across_a_merge_reproduces_the_uninterrupted_losses(workdir, uninterrupted, overrides):
    from trainer.train import train

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(workdir, "split"))
    assert train(cfg, stop_after=2) is None  # stops right after the first merge
    assert (workdir / "split" / "lora_stage1_merged" / "config.json").is_file()
    assert train(cfg, stop_after=3) is None  # resumes at the run boundary, stops mid generation
    assert [r["step"] for r in metrics(workdir / "split")] == [1, 2, 3]
    final = train(cfg)  # resumes from step-000003 in the middle of the generation stage
    assert final is not None and (final / "covt_heads.safetensors").is_file()
    assert metrics(workdir / "split") == metrics(uninterrupted)  # same stages, data and losses, bit for bit


def test_steps_cut_by_length_train_pad_less_and_resume_exactly(workdir, overrides):
    """train.sort_step_by_length at 2 micro-batches of 2 per step: the four stages and both merges; each step
    pads fewer tokens than the same run with its micro-batches in stream order, and its losses are that run's
    at the first two steps (the adapters' dropout off: its masks fall on other samples once they are sorted;
    relative 1e-5, later steps drift with fp32 summation order, see the packed test below); stopped after a
    merge and mid-stage, then resumed, it logs what it logs in one go with two loader workers, bit for bit."""
    from trainer.train import train

    def config(name: str, *extra: str):
        return load_config(REPO / "configs" / "tiny.yaml", [*overrides(workdir, name), "train.batch_size=2",
                                                           "train.grad_accum=2", "train.lora.dropout=0", *extra])

    assert train(config("in-order")) is not None
    by_length = config("by-length", "train.sort_step_by_length=true")
    assert train(by_length, stop_after=2) is None and train(by_length, stop_after=3) is None
    assert train(by_length) is not None
    sorted_, in_order = metrics(workdir / "by-length"), metrics(workdir / "in-order")
    assert [r["stage"] for r in sorted_] == [r["stage"] for r in in_order] and len(sorted_) == 7
    for a, b in zip(sorted_[:2], in_order[:2]):
        for key in ["loss", "text", *ANCHORS]:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    perf = {name: [json.loads(line) for line in (workdir / name / "perf-rank0.jsonl").read_text().splitlines()]
            for name in ("by-length", "in-order")}
    assert [p["tokens"] for p in perf["by-length"]] == [p["tokens"] for p in perf["in-order"]]
    padded = {name: sum(p["tokens"] / (1 - p["padding_fraction"]) for p in records) for name, records in perf.items()}
    assert padded["by-length"] < padded["in-order"], padded
    # in one go, each step's micro-batches built by one of two loader workers in turn
    assert train(config("by-length-whole", "train.sort_step_by_length=true", "train.num_workers=2")) is not None
    assert metrics(workdir / "by-length") == metrics(workdir / "by-length-whole")


def test_checkpoint_records_its_place_in_the_schedule(uninterrupted):
    from trainer.checkpoint import latest_checkpoint, read_meta

    meta = read_meta(latest_checkpoint(uninterrupted))
    assert meta["global_step"] == 7 and meta["stage"] == "efficient_reasoning" and meta["stage_end"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_trains_resumes_and_exports_gathered_heads(workdir, zero, overrides):
    """ZeRO-2/3 through torchrun on the CPU (one rank): partitioned LoRA/heads are gathered for merges and export."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    out = workdir / zero
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "trainer",
           "--config", "configs/tiny.yaml", *overrides(workdir, zero), "train.device=cpu",
           f"train.deepspeed=configs/deepspeed/{zero}.json"]
    for extra in (["--stop-after", "3"], []):
        proc = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert (out / "checkpoints" / "step-000007" / "deepspeed").is_dir()
    heads = load_file(out / "final" / "covt_heads.safetensors")
    last = load_file(out / "checkpoints" / "step-000007" / "trainable.safetensors")
    for name, value in heads.items():
        assert value.numel() > 0, name  # not a ZeRO-3 partition placeholder
        if f"heads.{name}" in last:
            torch.testing.assert_close(value, last[f"heads.{name}"].to(value.dtype), atol=0, rtol=0)


def test_deepspeed_without_a_launcher_starts_a_one_process_group():
    """`make train` with train.deepspeed set runs plain `python -m trainer`: no RANK, no MPI. DeepSpeed joins the
    group compute_init starts (the DeepSpeed tests above train through it)."""
    pytest.importorskip("deepspeed")
    code = ("from covt.compute import compute_init\n"
            "from datetime import timedelta\n"
            "import torch\n"
            "c = compute_init('cpu', 'train.device', timedelta(hours=2), group_of_one=True)\n"
            "print((c.rank, c.world, c.device), torch.distributed.get_world_size())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(0, 1, device(type='cpu')) 1")


def test_packed_micro_batches_train_every_stage_as_padded_ones_do(workdir, overrides):
    """train.packing: micro-batches of 2 samples in one row each, through all four stages and both merges, with
    the losses of the same run on padded micro-batches at its first two steps (relative 1e-5; measured equal to
    7 digits). Later steps are not compared: the anchor heads turn last-bit differences of the hidden states into
    gradient differences of ~1e-4 (tests/test_micro_batches.py), and AdamW's per-element normalisation turns
    gradient elements that are mostly rounding noise into +-lr updates, so on this tiny run at lr 5e-3 any change
    of fp32 summation order moves the later losses (measured: 2e-5 in the loss, 1.3% in the depth loss at step 3,
    where identical parameters still give packed = padded within 3e-5, all stages)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs = {}
    for packing in ("true", "false"):
        out = workdir / f"batch2-packing-{packing}"
        cmd = [sys.executable, "-m", "trainer", "--config", "configs/tiny.yaml", *overrides(workdir, out.name),
               "train.batch_size=2", f"train.packing={packing}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert load_config(out / "config.yaml").train.packing == (packing == "true")
        assert (out / "final").is_dir()
        runs[packing] = metrics(out)
    packed, padded = runs["true"], runs["false"]
    assert [r["step"] for r in packed] == list(range(1, 8))
    assert [r["stage"] for r in packed] == ["understanding"] * 2 + ["generation"] * 2 + ["reasoning"] + \
        ["efficient_reasoning"] * 2
    assert [r["anchor_losses"] for r in packed] == [True] * 6 + [False]
    assert [set(a) for a in packed] == [set(b) for b in padded]
    assert all(np.isfinite(r["loss"]) for r in packed)
    for a, b in zip(packed[:2], padded[:2]):
        for key in ["loss", "text", *ANCHORS]:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_compiled_blocks_train_every_stage_as_eager_ones_do(workdir, uninterrupted, overrides):
    """train.compile (with activation checkpointing on, train.tf32, which changes nothing on the CPU, and the fused
    AdamW, train.optim=adamw_torch_fused, which moves the weights by rounding only, and the SAM head's matching on
    the device, train.sam_matching=device, which matches as scipy does, and causal text attention over the right
    padding, train.padding_mask=false, which gives every real token the same output, and the adapters' thin
    products split-K, train.lora.split_k, which sums them in another order) through all four stages, both merges
    (the model loaded anew and compiled again for the second run) and the export:
    the first two steps' losses are those of the eager run (relative 1e-5; later steps move with any change of
    fp32 summation order, see the packed test above), and the final folder has the keys of the eager run's."""
    from safetensors import safe_open

    out = workdir / "compiled"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "trainer", "--config", "configs/tiny.yaml", *overrides(workdir, out.name),
           "train.compile=true", "train.gradient_checkpointing=true", "train.tf32=true",  # tf32: CUDA only
           "train.optim=adamw_torch_fused", "train.sam_matching=device", "train.padding_mask=false",
           "train.lora.split_k=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # each of the two runs: 2 decoder layers + 2 vision blocks
    assert (proc.stdout + proc.stderr).count("train.compile: 4 blocks compile at their first shapes (default)") == 2
    assert "recompile_limit" not in proc.stderr  # dynamo's warning when a block falls back to eager code
    compiled, eager = metrics(out), metrics(uninterrupted)
    assert [r["stage"] for r in compiled] == [r["stage"] for r in eager]
    assert all(np.isfinite(r["loss"]) for r in compiled)
    for a, b in zip(compiled[:2], eager[:2]):
        for key in ["loss", "text", *ANCHORS]:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for name in ("model.safetensors", "covt_heads.safetensors"):
        with safe_open(out / "final" / name, "pt") as f, safe_open(uninterrupted / "final" / name, "pt") as g:
            assert set(f.keys()) == set(g.keys()), name


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="train.cuda_graphs records CUDA graphs: needs a GPU (run on the device, BENCHMARKS.md)")
def test_cuda_graphs_train_every_stage_as_direct_steps_do(workdir, overrides, run_trainer):
    """train.cuda_graphs on a GPU (fp32, as configs/tiny.yaml trains): all four stages, both merges (a new model and
    new graphs for the second run) and the export, each micro-batch padded to 64 tokens (train.pad_to_multiple_of,
    few layouts) and replayed as one graph. The first two steps' losses are those of the same run without graphs
    (relative 1e-4: the same kernels, summed in another order only where atomics add); LoRA dropout is off in both,
    as a replay draws other masks than a direct run."""
    runs = {}
    for graphs in ("true", "false"):
        out = workdir / f"cuda-graphs-{graphs}"
        run_trainer(["--config", "configs/tiny.yaml", *overrides(workdir, out.name), "train.device=cuda",
                     f"train.cuda_graphs={graphs}", "train.pad_to_multiple_of=64", "train.sam_matching=device",
                     "train.lora.dropout=0"])
        assert (out / "final" / "covt_heads.safetensors").is_file()
        runs[graphs] = metrics(out)
    graphed, direct = runs["true"], runs["false"]
    assert [r["stage"] for r in graphed] == ["understanding"] * 2 + ["generation"] * 2 + ["reasoning"] + \
        ["efficient_reasoning"] * 2
    assert [set(a) for a in graphed] == [set(b) for b in direct]
    assert all(np.isfinite(r["loss"]) for r in graphed)
    for a, b in zip(graphed[:2], direct[:2]):
        for key in ["loss", "text", *ANCHORS]:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
