"""One CoVT training step vs one plain Qwen2.5-VL LoRA fine-tuning step, side by side.

Builds a Qwen2.5-VL-7B-sized model with RANDOM weights from a Qwen2_5_VLConfig with
the real 7B dimensions, directly on the GPU in bf16 (nothing is downloaded), twice:

  plain: LoRA on the LLM + vision tower, text loss only, on the sample's conversation;
  covt:  the same LoRA + trainable thought-token rows + the sam/depth/dino heads, on the
         same sample in a CoVT stage format, the heads consuming synthetic targets of the
         real cached shapes (SAM embedding 256x64x64 + 8 masks 256x256, Depth Anything
         ViT-L 4x1369x1024 + 256x256 depth, DINOv2 ViT-L 1025x1024) and a SAM decoder
         file built from segment_anything's ViT-H-sized prompt encoder / mask decoder.

A step = host->device copy of the batch, forward, backward, gradient clipping and the
AdamW step, exactly as trainer/train.py does it (bf16 autocast, gradient checkpointing).
The batches are tokenised once beforehand (in training that happens while the GPU runs
the previous step). Steps alternate plain/covt after warm-up and are timed with CUDA
events; the medians, their ratio and the peak memory are printed.

    python bench/bench_train_step.py                       # H100: the 7B model
    python bench/bench_train_step.py --device cpu --tiny   # smoke test anywhere
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.anchors import array_shape, get_anchor  # noqa: E402
from shards.config import Config, LoraConfig, StageConfig  # noqa: E402
from shards.views import open_rgb  # noqa: E402
from trainer.batch import batch_to, build_batch  # noqa: E402
from trainer.formats import STAGES  # noqa: E402
from trainer.heads import CacheDims, build_heads  # noqa: E402
from trainer.lora import attach_lora, trainable_summary  # noqa: E402
from trainer.model import VLM_INPUTS, CoVTModel  # noqa: E402
from trainer.tiny_model import build_processor, build_tokenizer, tiny_config  # noqa: E402
from trainer.tokens import add_thought_tokens  # noqa: E402
from trainer.optim import param_groups  # noqa: E402
from trainer.train import MAX_GRAD_NORM  # noqa: E402

ANCHORS = ["sam", "depth", "dino"]

# Cached target sizes of the 7B recipe's anchors (SAM ViT-H, Depth Anything V2 ViT-L, DINOv2 ViT-L/14 at 448).
REAL_DIMS = {
    "sam": {"embed_dim": 256, "embed_h": 64, "embed_w": 64, "max_masks": 8, "mask_h": 256, "mask_w": 256},
    "depth": {"layers": 4, "patches": 1369, "dim": 1024, "map_h": 256, "map_w": 256},
    "dino": {"tokens": 1025, "dim": 1024},
}
TINY_DIMS = {
    "sam": {"embed_dim": 32, "embed_h": 16, "embed_w": 16, "max_masks": 8, "mask_h": 64, "mask_w": 64},
    "depth": {"layers": 4, "patches": 64, "dim": 32, "map_h": 32, "map_w": 32},
    "dino": {"tokens": 17, "dim": 32},
}
# segment_anything's ViT-H prompt encoder / mask decoder (build_sam_vit_h) and a toy one
REAL_SAM = dict(embed_dim=256, image_hw=64, input_size=1024, depth=2, mlp_dim=2048, num_heads=8)
TINY_SAM = dict(embed_dim=32, image_hw=16, input_size=64, depth=2, mlp_dim=64, num_heads=2)


def qwen2_5_vl_7b_config(tokenizer):
    """The dimensions of Qwen/Qwen2.5-VL-7B-Instruct's config.json; special-token ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
        out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_vlm(config, device: torch.device, dtype: torch.dtype, grad_ckpt: bool):
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        vlm = AutoModelForImageTextToText.from_config(config, dtype=dtype)  # Qwen2_5_VLForConditionalGeneration
    if grad_ckpt:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return vlm


def write_sam_decoder(folder: Path, spec: dict, seed: int = 0) -> None:
    """Random-weight PromptEncoder + MaskDecoder in precompute's sam_decoder.pt format."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from precompute.anchors.sam import save_decoders

    torch.manual_seed(seed)
    d = spec["embed_dim"]
    prompt_encoder = PromptEncoder(embed_dim=d, image_embedding_size=(spec["image_hw"],) * 2,
                                   input_image_size=(spec["input_size"],) * 2, mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=d, iou_head_depth=3, iou_head_hidden_dim=256,
                               transformer=TwoWayTransformer(depth=spec["depth"], embedding_dim=d,
                                                             mlp_dim=spec["mlp_dim"], num_heads=spec["num_heads"]))
    sam = Sam(image_encoder=torch.nn.Identity(), prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    save_decoders(sam, folder)


def synthetic_targets(dims: dict[str, dict[str, int]], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random targets with the shapes and dtypes the cache reader yields."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for anchor in ANCHORS:
        out[anchor] = {}
        for array in get_anchor(anchor).arrays:
            shape = array_shape(anchor, array.name, dims[anchor])
            if array.kind == "mask":
                out[anchor][array.name] = torch.rand(shape, generator=g) > 0.5
            elif array.kind == "count":
                out[anchor][array.name] = torch.tensor(dims[anchor].get("max_masks", 1), dtype=torch.int64)
            else:
                out[anchor][array.name] = torch.rand(shape, generator=g)
    return out


def sample(targets) -> dict:
    records = json.loads((REPO / "data/sample/conversations.json").read_text())
    record = records[0]
    image_bytes = (REPO / "data/sample/images" / record["image"]).read_bytes()
    return {"index": 0, "key": record["id"], "id": record["id"], "conversations": record["conversations"],
            "images": [open_rgb(image_bytes)], "image_bytes": [image_bytes], "targets": targets}


def plain_batch_of(one: dict, processor, image_size: int) -> dict:
    """The sample's first exchange without visual thoughts, the reference's layout, labels on the answer only."""
    from PIL import Image

    from shards.views import square_view
    from trainer.batch import encode_text
    from trainer.formats import plain_text

    view = Image.fromarray(square_view(one["images"][0], image_size))
    row = encode_text(plain_text(one["conversations"]), view, processor)
    return {k: (v if k in ("pixel_values", "image_grid_thw") else v[None]) for k, v in row.items()}


def make_step(model: torch.nn.Module, params: list[dict], batch_cpu: dict, device: torch.device, covt: bool,
              bf16: bool):
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trainable = [p for g in params for p in g["params"]]

    def step() -> None:
        batch = batch_to(batch_cpu, device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False):
            if covt:
                loss = model(batch, anchor_losses=True)["loss"]
            else:
                inputs = {k: batch[k] for k in VLM_INPUTS if k in batch}
                loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device: torch.device) -> tuple[float, int]:
    """Milliseconds of one step and the peak memory during it (bytes, cuda only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end), torch.cuda.max_memory_allocated(device)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1000, 0


def profile(steps: dict, device: torch.device) -> None:
    """Top operators (self device time, then self CPU time) of one step of each kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, step in steps.items():
        with torch_profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile of one {name} step, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
        print(f"--- profile of one {name} step, by self_cpu_time_total")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and targets (smoke test)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage", default="understanding", choices=STAGES)
    parser.add_argument("--no-gradient-checkpointing", dest="grad_ckpt", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each kind")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    image_size = 112 if args.tiny else 448
    dims, sam_spec = (TINY_DIMS, TINY_SAM) if args.tiny else (REAL_DIMS, REAL_SAM)

    processor = build_processor(build_tokenizer(), image_size)
    tokens = add_thought_tokens(processor)  # ids stay below the 7B vocabulary: no resize needed
    config = tiny_config(processor.tokenizer) if args.tiny else qwen2_5_vl_7b_config(processor.tokenizer)
    hidden = config.text_config.hidden_size
    lora = LoraConfig()  # the recipe's r16 / alpha 32 / dropout 0.01 on LLM + vision tower

    cfg = Config(anchors=list(ANCHORS))
    cfg.model.image_size = image_size
    stage = StageConfig(args.stage, 1)
    one = sample(synthetic_targets(dims))
    plain_batch = plain_batch_of(one, processor, image_size)

    decoders = Path(tempfile.mkdtemp(prefix="bench-decoders-"))
    write_sam_decoder(decoders, sam_spec)

    torch.manual_seed(0)
    plain_vlm = attach_lora(build_vlm(config, device, dtype, args.grad_ckpt), lora, [])
    plain_params = [{"params": [p for p in plain_vlm.parameters() if p.requires_grad]}]
    plain_step = make_step(plain_vlm, plain_params, plain_batch, device, covt=False, bf16=bf16)

    covt_vlm = build_vlm(config, device, dtype, args.grad_ckpt)
    if tokens.ids and max(tokens.ids) >= covt_vlm.get_input_embeddings().weight.shape[0]:
        covt_vlm.resize_token_embeddings(max(tokens.ids) + 1, mean_resizing=False)
    covt_vlm = attach_lora(covt_vlm, lora, tokens.ids)
    heads = build_heads(ANCHORS, hidden, CacheDims(dims, decoders))
    covt = CoVTModel(covt_vlm, heads, tokens).to(device).train()
    covt_batch = build_batch([one], stage, True, 0, processor, tokens, cfg, view_sizes=covt.view_sizes())
    covt_step = make_step(covt, param_groups(covt, cfg.train), covt_batch, device, covt=True, bf16=bf16)
    # the same token sequence as the CoVT step (thought tokens included) through the plain LoRA model:
    # what the CoVT machinery (heads, cached targets, trainable token rows) adds on the same batch
    same_step = make_step(plain_vlm, plain_params, covt_batch, device, covt=False, bf16=bf16)

    print(f"device {device} ({torch.cuda.get_device_name(device) if bf16 else 'cpu'}), "
          f"{'tiny' if args.tiny else 'Qwen2.5-VL-7B-sized'} random weights, {dtype}, "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}, image {image_size}x{image_size}, bs 1")
    print(f"plain: {trainable_summary(plain_vlm)}, {plain_batch['input_ids'].shape[1]} tokens")
    print(f"covt:  {trainable_summary(covt)}, {covt_batch['input_ids'].shape[1]} tokens, stage {args.stage}, "
          f"heads {ANCHORS}")

    steps = {"plain": plain_step, "plain_same_batch": same_step, "covt": covt_step}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    if args.profile:
        profile(steps, device)
    times = {name: [] for name in steps}
    peaks = {name: [] for name in steps}
    for _ in range(args.steps):  # alternate so drift (clocks, thermals) hits all alike
        for name, step in steps.items():
            ms, peak = timed(step, device)
            times[name].append(ms)
            peaks[name].append(peak)
    plain_ms, covt_ms, same_ms = times["plain"], times["covt"], times["plain_same_batch"]
    plain_peak, covt_peak = peaks["plain"], peaks["covt"]

    result = {
        "device": torch.cuda.get_device_name(device) if bf16 else "cpu",
        "model": "tiny" if args.tiny else "qwen2.5-vl-7b-sized",
        "stage": args.stage,
        "steps": args.steps,
        "plain_ms_median": statistics.median(plain_ms),
        "covt_ms_median": statistics.median(covt_ms),
        "ratio": statistics.median(covt_ms) / statistics.median(plain_ms),
        "plain_same_batch_ms_median": statistics.median(same_ms),
        "ratio_same_batch": statistics.median(covt_ms) / statistics.median(same_ms),
        "plain_same_batch_ms": same_ms,
        "plain_ms": plain_ms,
        "covt_ms": covt_ms,
        "plain_peak_gib": max(plain_peak) / 2**30,
        "covt_peak_gib": max(covt_peak) / 2**30,
    }
    print(f"plain LoRA step: {result['plain_ms_median']:.1f} ms (median of {args.steps})")
    print(f"CoVT step:       {result['covt_ms_median']:.1f} ms (median of {args.steps})")
    print(f"plain LoRA step on the CoVT step's token sequence: {result['plain_same_batch_ms_median']:.1f} ms")
    print(f"ratio covt/plain, same batch (same tokens): {result['ratio_same_batch']:.3f} (target <= 1.10)")
    print(f"ratio covt/plain, the sample's own conversation ({covt_batch['input_ids'].shape[1] - plain_batch['input_ids'].shape[1]}"
          f" thought tokens fewer): {result['ratio']:.3f}")
    if bf16:
        print(f"peak memory during a step (both models resident): plain {result['plain_peak_gib']:.1f} GiB, "
              f"covt {result['covt_peak_gib']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
