"""Typed configuration shared by both phases.

A config is a YAML file validated into the dataclasses below, then overridden
from the command line with ``key.sub=value`` (the value is parsed as YAML, so
``train.lr=1e-4``, ``anchors=[sam,depth]`` and ``data.on_bad_record=error``
all work). An unknown key or a value of the wrong type is an error naming the
dotted key. The seed's vocabulary maps onto it: DATA_PATH -> ``data.path``,
IMAGE_FOLDER -> ``data.image_folder``, VISUAL_MODEL_ID -> ``anchors``.

Relative paths in a config file are resolved against the current working
directory (the repository root when run through ``make``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from covt.fs import atomic_write


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text, which ``--help`` and the README's config table show."""
    return field(default=default, default_factory=factory, metadata={"help": help})


# --------------------------------------------------------------------------- data
@dataclass
class SubsetConfig:
    """Cache a seeded subset instead of every record: the recipe consumes steps x global batch samples."""

    size: int | None = option(
        None, "good records to cache (None = all); the recipe's 16000 steps x batch 8 = 128000")
    seed: int = option(0, "seed of the subset's permutation of the records")


@dataclass
class DataConfig:
    path: str = option("data/sample/conversations.json", "DATA_PATH: LLaVA JSON / JSONL or parquet file/glob/folder")
    image_folder: str = option("data/sample/images", "IMAGE_FOLDER (JSON input; parquet holds the image bytes)")
    on_bad_record: Literal["skip", "error"] = option(
        "skip", "skip (report, count in the manifest) or stop at a bad record")
    limit: int | None = option(None, "read only the first N records (debugging)")
    subset: SubsetConfig = option(factory=SubsetConfig, help="a seeded subset of the records")
    # held-out samples for validation losses: N = the last N records of data.path, or a LLaVA JSON of its own;
    # precompute caches them in <cache.dir>/validation (shards.layout.VALIDATION_DIR), never in the training cache
    validation: int | str | None = option(
        None, "held-out validation samples: a count (last N records) or a JSON file")


# -------------------------------------------------------------------------- cache
@dataclass
class CacheConfig:
    dir: str = option("runs/tiny/cache", "where precompute writes, and train reads: a folder or s3:// (fsspec) URL")
    shard_size: int = option(
        64, "samples per webdataset tar shard (= zarr shard); ~22 MB of targets per image with depth ViT-L")
    # auto: per array the smallest codec within 1% head error (BENCHMARKS.md), re-measured on the first shard
    codec: str = option("auto", "default codec of float target arrays: auto, bf16, fp8row, lowrank64, ...")
    codecs: dict[str, str] = option(factory=dict, help="per array: \"depth/features\": \"fp8row\"")
    # relative L2 error on the first shard above which a lossy codec falls back to bf16; None = each array's
    # validated bound from shards/codec_defaults.json (where the bench's head errors would reach 1%)
    codec_max_error: float | None = option(
        None, "relative L2 error above which a codec falls back to bf16 (None: validated)")
    # cache.dir may be an fsspec URL (s3://bucket/cache, gs://, https://): its local copy and precompute's staging
    # folder go here (shards.storage.local_home); the copy is shared by every process using the folder
    local_dir: str = option("", "local copy/staging of a URL cache.dir (default: $COVT_CACHE_LOCAL or the temp dir)")
    local_max_gb: float = option(
        50.0, "bound of that local copy, for all loader workers/ranks sharing it; >= 2 shards per worker")

    def cache_kwargs(self) -> dict:
        """Keyword arguments of ``shards.reader.Cache`` / ``StreamingDataset`` for this config."""
        return {"local_dir": self.local_dir or None, "local_max_bytes": int(self.local_max_gb * (1 << 30))}


# --------------------------------------------------------------------- precompute
@dataclass
class CheckpointConfig:
    """Where one anchor's weights live, in the format users download."""

    path: str = option("", "file (.pth) or Hugging Face folder")
    variant: str = option("", "e.g. vit_h / vit_l / vit_b for SAM, vitl / vits for depth and dino")
    random_init_seed: int | None = option(None, "tiny default only: write seeded random weights here if missing")
    # small images (bench/learn's synthetic world) need not be upscaled to 256: a CPU spends 5x less per image at 112
    input_size: int | None = option(None, "pidinet only: side of the square view it computes from (None: 256)")


@dataclass
class SamPrecomputeConfig:
    # The defaults are segment_anything's SamAutomaticMaskGenerator's, which the reference calls with no
    # arguments (covt_qwen2_5_vl.py 424), then keeps the top 8 by predicted IoU x stability (648-676)
    points_per_side: int = option(32, "automatic mask generation point grid (SAM's default 32)")
    max_masks: int = option(8, "reference masks kept per image, the best by predicted IoU x stability")
    pred_iou_thresh: float = option(0.88, "keep masks whose predicted IoU exceeds this")
    stability_score_thresh: float = option(0.95, "keep masks at least this stable (logit offset 1)")
    box_nms_thresh: float = option(0.70, "box IoU above which the lower-ranked mask is dropped")
    nms_score: Literal["pred_iou", "iou_x_stability"] = option(
        "pred_iou", "what box NMS ranks duplicates by (SAM's generator: pred_iou)")
    point_batch_size: int = option(256, "point prompts per mask-decoder call")
    # the masks of a prompt whose predicted IoUs all fail pred_iou_thresh are never made (that threshold would drop
    # every one of them): the same candidates, less upscaling work where the threshold bites
    iou_first: bool = option(True, "make masks only for prompts with a predicted IoU above pred_iou_thresh")
    # The same function three ways (precompute/anchors/sam_fast.py): segment_anything's own attention, or fused
    # SDPA with the relative-position terms as an additive bias or folded into wider q/k; sdpa_fold measured
    # fastest on an H100 (BENCHMARKS.md).
    encoder_attention: Literal["library", "sdpa_bias", "sdpa_fold"] = option("sdpa_fold", "SAM image encoder attention")
    # segment_anything pads each windowed block's normed tokens to whole 14x14 windows (ViT-H: 64x64 -> 70x70) and
    # projects the padding too; the same function with the qkv projection padded by its bias and the output
    # projection on the image's tokens only is 5% fewer encoder FLOPs (precompute/anchors/sam_fast.py): compiled
    # 1.05x, eager even on an H100 (bench_precompute.py --encoder-variants); on in the 7B configs
    unpadded_windows: bool = option(False, "SAM encoder's windowed blocks: no projection of the window padding")
    compile_encoder: bool = option(False, "torch.compile the image encoder (compiles on the first batch)")
    # the per-prompt work on the 64x64 image tokens (norms, activations, upscaling) fused by inductor
    compile_decoder: bool = option(False, "torch.compile the mask decoder's batched decoding (compiles on first use)")
    # library: segment_anything's attention maths (q @ k^T, softmax, @ v: TF32 matrix products under precompute.tf32,
    # as the reference runs it); sdpa: one fused kernel (in fp32 a full-precision one). Every decoder attention has
    # the prompt's 7 tokens on one side, which the fused kernels' 64-row tiles waste; folded: the same function with
    # the image side's projections moved onto the 7 tokens' side (precompute/anchors/sam_fast.py), 2.1x fewer
    # multiply-adds per prompt in the decoder's transformer (2.01 -> 0.95 GFLOP, BENCHMARKS.md)
    decoder_attention: Literal["library", "sdpa", "folded"] = option("library",
                                                                     "the mask decoder's attention computation")
    # Under bf16 autocast the decoder's LayerNorms give each prompt's (4096, 256) image tokens in float32, and every
    # later product and norm of the decoder reads them again: kept in bf16 instead, that traffic halves (the tokens
    # rounded to bf16 between the layers). Compiled with the fused masks, mask generation 1.12x at 32 points on an H100
    # (bench_precompute.py --bf16-decoder-tokens, BENCHMARKS.md); no effect with precompute.dtype fp32
    decoder_tokens_bf16: bool = option(True, "with precompute.dtype bf16 on CUDA, the mask decoder's per-prompt "
                                             "image tokens kept in bf16 between its layers")
    # the two upscalings and the mask/stability counts per prompt in one Triton kernel that writes no logits
    # (precompute/anchors/sam_masks.py); the same masks and counts as the logits' path. On an H100 1.22x the compiled
    # logits' path on mask generation in bf16, 1.11x in fp32 with TF32 (BENCHMARKS.md); on in the 7B configs
    fused_masks: bool = option(False, "on CUDA, SAM's mask upscaling and statistics in one Triton kernel")
    # subpixels: a product per sub-pixel of each upscaling (N = 64, then 32); grouped: the second upscaling's 4
    # sub-pixels in one product (N = 128) and the masks' contraction block-diagonal over them (bench_mask_kernel.py);
    # auto: grouped for bf16 tokens, subpixels for fp32 ones, the faster of the two on an H100 in each
    mask_kernel: Literal["auto", "subpixels", "grouped"] = option("auto", "which Triton kernel fused_masks runs")


@dataclass
class PrecomputeConfig:
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["bf16", "fp32"] = option("bf16", "anchors that do not tolerate bf16 stay fp32")
    # Hugging Face's tf32: fp32 matrix products on tensor cores; the reference's anchors ran so (run.sh --tf32 True)
    tf32: bool = option(False, "fp32 matrix products in TF32 on CUDA (the reference's run.sh --tf32 True)")
    batch_size: int = option(8, "images per anchor forward pass")
    num_workers: int = option(2, "image decoding workers")
    checkpoints: dict[str, CheckpointConfig] = option(factory=dict, help="anchor name -> its checkpoint")
    # square: every anchor from the square view the VLM sees; reference: the reference's own inputs (256 thumbnails,
    # BGR into Depth Anything, zero-padded DINO...: precompute/views.py), to compare with its released checkpoints
    views: Literal["square", "reference"] = option("square", "what the anchors compute from (square / reference)")
    # each batch's other anchors in a second thread on a CUDA stream of their own while SAM computes
    # (precompute.run.AnchorsBesideSam): the same targets; their kernels fill what SAM's mask generation leaves
    overlap_anchors: bool = option(False, "the other anchors on a second CUDA stream beside SAM")
    # each listed anchor's network through torch.compile (AnchorModel.compile_network), compiled on its first batch;
    # SAM has its own switches (precompute.sam.compile_encoder, compile_decoder)
    compile_anchors: list[Literal["depth", "dino", "pidinet", "siglip", "metaclip"]] = option(
        factory=list, help="anchors whose network runs through torch.compile (not sam: precompute.sam.compile_*)")
    sam: SamPrecomputeConfig = field(default_factory=SamPrecomputeConfig)


# -------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    path: str = option("runs/tiny/base_model", "Hugging Face Qwen2.5-VL folder")
    build_tiny_if_missing: bool = option(False, "tiny default only: build a random tiny Qwen2.5-VL at path")
    image_size: int = option(448, "the square view the VLM sees")


# -------------------------------------------------------------------------- train
PLAIN_ANSWER_FRACTION = 1 / 6  # the reference draws randint(0, 5) == 0 per stage-4 sample
STAGE_NAMES = ("understanding", "generation", "reasoning", "efficient_reasoning")  # the four formats, in order


@dataclass
class StageConfig:
    name: Literal[STAGE_NAMES] = option(help="the data format")
    steps: int = option(help="optimizer steps")
    anchor_losses: bool = option(True, "anchor losses on in this stage")
    anchor_losses_off_from: int | None = option(
        None, "run step (since the last merge) from which anchor losses are off")
    merge_after: bool = option(False, "merge LoRA into the base after this stage")


@dataclass
class LoraConfig:
    # false: full-parameter training (every VLM parameter trains, no peft; a merge saves the trained weights), as
    # 2U1/Qwen-VL-Series-Finetune offers for small models
    enabled: bool = option(True, "LoRA adapters; false = full-parameter training (every VLM parameter trains)")
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha")
    dropout: float = option(0.01, "LoRA dropout")
    vision_tower: bool = option(True, "LoRA on the vision tower as well as the LLM")
    merger: bool = option(True, "LoRA also on the vision tower's patch merger (its 2 Linear layers), as the reference")
    # peft copies each adapter's (bf16) input to fp32, its weights' dtype, and autocast copies it back for the
    # matmul: two activation-sized casts per adapter and dropout in fp32. false: the adapters take the bf16
    # activations as they are (weights and optimizer stay fp32; autocast casts the small weights once per forward),
    # as the reference's adapters compute under DeepSpeed bf16. Equal without dropout (tests/test_trainer_lora.py)
    fp32_inputs: bool = option(True, "adapters cast their bf16 inputs to fp32 (peft's default); false: no cast")
    # peft keeps, for each adapter, its dropped copy of the input and the dropout mask until the backward pass
    # (eager: 3 bytes per input element in bf16; compiled code may keep only the 1-byte mask). true: only the input
    # stays (the base layer keeps it anyway), and the dropout runs again in the backward pass with the random state
    # restored: the same masks, loss and gradients (tests/test_trainer_lora.py), less memory for one elementwise pass
    recompute_dropout: bool = option(False, "the adapters' dropout made again in the backward pass, not kept")
    # peft's trainable-token layers copy the whole embedding (and untied lm_head) with the thought-token rows written
    # in at every forward, and make the whole matrix's gradient in the backward to keep those rows'. true: the
    # frozen matrix runs as it is and only the rows' embeddings and logit columns come from the trained rows: the
    # same values (logits within the product's rounding), no 1.1 GB copies per forward at the 7B size; on in the 7B
    # configs. Off by default, as peft computes it: the rounding differs, and a small run's outcome can follow the
    # rounding (make learn-quick's did: BENCHMARKS.md, nineteenth session)
    separate_token_rows: bool = option(False, "thought-token rows computed apart from the frozen embedding/lm_head "
                                              "(false: peft's merged copy of the whole matrix per forward)")
    # At rank 16, four of each adapter's products have an output 16 wide (lora_A's forward and weight gradient,
    # lora_B's input and weight gradients), a few GEMM tiles for a whole GPU. true: their reductions are cut into
    # slices run as one batched product and summed in fp32 (trainer/split_k.py): the same products in more tiles
    split_k: bool = option(False, "the adapters' 16-wide products computed split-K (sliced reduction, fp32 sum)")
    target_modules: list[str] = option(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj"],
        help="module names that get LoRA (LLM and vision blocks)")


@dataclass
class TrainConfig:
    output_dir: str = option("runs/tiny/train", "checkpoints, merged models, final/, tb/, metrics.jsonl")
    stages: list[StageConfig] = option(factory=list, help="the schedule, in order")
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss_weights: dict[str, float] = option(factory=dict, help="anchor -> weight (default 1)")
    # AdamW as the reference's trainer.py: two learning rates, decay on all but biases and norms
    lr: float = option(5e-5, "LoRA, new token rows and heads (the reference's learning_rate)")
    projection_lr: float = option(1e-5, "parameters named *_projection*, *query_vectors*, *cross_attention*")
    weight_decay: float = option(0.1, "AdamW weight decay, except biases and norm weights")
    # Hugging Face TrainingArguments' names and defaults (the reference's run.sh leaves them at these)
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    # Hugging Face TrainingArguments' optim (its default from torch 2.8): adamw_torch_fused updates every tensor in
    # a few kernel launches instead of a few per tensor group, the same update up to rounding; the reference's
    # params.py sets adamw_torch (torch's multi-tensor AdamW)
    optim: Literal["adamw_torch", "adamw_torch_fused"] = option(
        "adamw_torch", "AdamW implementation: adamw_torch (the reference's) or adamw_torch_fused (fused kernels)")
    warmup_ratio: float = option(0.05, "linear warm-up over this share of each run, then cosine to 0 (per run)")
    batch_size: int = option(1, "per device")
    grad_accum: int = option(1, "micro batches per optimizer step")
    # when set, grad_accum follows from it: global_batch / (batch_size x GPUs), so one config keeps the recipe's
    # global batch on any number of GPUs
    global_batch: int | None = option(None, "samples per optimizer step over all GPUs (sets grad_accum)")
    max_length: int | None = option(2048, "tokens; truncation never cuts an image or a thought (None: no limit)")
    num_workers: int = option(0, "DataLoader workers reading the cache")
    bf16: bool = option(True, "ignored on CPU")
    tf32: bool = option(False, "fp32 matrix products in TF32 on CUDA (the reference's run.sh --tf32 True)")
    gradient_checkpointing: bool = option(True, "activation checkpointing of the VLM")
    # varlen: every vision window of a micro-batch in one kernel call (trainer/vision_attention.py); sdpa: transformers'
    # one call per window. The same function; varlen is the fast one on a GPU and falls back to sdpa's maths on CPU.
    vision_attention: Literal["varlen", "sdpa"] = option("varlen", "the vision tower's attention")
    # null on several processes (torchrun): plain data parallel, the gradients averaged once per optimizer step
    deepspeed: str | None = option(None, "path to a DeepSpeed JSON (configs/deepspeed/zero2.json)")
    save_every: int = option(0, "optimizer steps between checkpoints; 0 = only at stage ends")
    # Hugging Face's name; the older checkpoints are deleted once a new one is complete
    save_total_limit: int | None = option(2, "checkpoints kept (the newest); null keeps every one")
    log_every: int = option(1, "optimizer steps between TensorBoard points")
    # Hugging Face TrainingArguments' report_to: every tracker gets metrics.jsonl's scalars + step time, samples/s,
    # GPU memory (trainer/metrics.py); wandb: $WANDB_PROJECT, mlflow: $MLFLOW_TRACKING_URI, $MLFLOW_EXPERIMENT_NAME
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = option(
        factory=lambda: ["tensorboard"], help="trackers: tensorboard, wandb, mlflow (pip install .[wandb]), none")
    run_name: str | None = option(None, "the trackers' run name (default: output_dir's folder name)")
    seed: int = option(0, "data order, stage-4 choices, LoRA init, dropout")
    on_damaged_sample: Literal["error", "skip"] = option(
        "error", "a sample failing its checksums: stop, or skip (logged)")
    max_nonfinite_steps: int = option(5, "skipped steps in a row (non-finite loss or gradient) that stop the run")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (under a launcher: cuda:LOCAL_RANK)")
    plain_answer_fraction: float = option(
        PLAIN_ANSWER_FRACTION, "stage 4: share of plain answers (the reference's 1 in 6)")
    # false: the direct fine-tune control of CoVT: same schedule, data, LoRA and optimizer, every answer plain
    thoughts: bool = option(True, "false: no visual thoughts and no anchor losses (the direct fine-tune control)")
    validate_every: int = option(0, "optimizer steps between validation losses (needs data.validation); 0 = never")
    # every collective of the ranks (gradient reduction, barriers) waits at most this long, then the rank stops
    # naming its step and stage; it must cover rank 0's merge and export (minutes for a 7B) while the others wait
    collective_timeout_minutes: float = option(120.0, "how long a rank waits for the others (several ranks)")
    # What the reference does as its code runs with the library versions it pins (README, "Differences from the
    # reference"); the dataclass defaults are the evident intent, configs/covt_7b_*.yaml set the reference's.
    lr_scheduler: Literal["cosine"] = option("cosine", "warm-up (train.warmup_ratio) then cosine to 0, per run")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this; 0 or null: no clipping")
    new_token_rows: Literal["every_run", "first_run"] = option(
        "every_run", "runs whose added-token rows get gradients (first_run: later runs only decay them)")
    trained_head_parameters: Literal["all", "projection_query_attention"] = option(
        "all", "head parameters that train (projection_query_attention: the depth head's MLP stays at its init)")
    head_init: Literal["torch", "transformers"] = option(
        "torch", "head init: torch's defaults, or transformers' for missing keys (Linear N(0, 0.02), bias 0)")
    stage4_draws: Literal["per_sample", "per_step"] = option(
        "per_sample", "stage-4 format draws: one per sample, or one per optimizer step shared by its samples")
    data_order: Literal["continue", "restart_each_run"] = option(
        "continue", "each run continues the data stream, or restarts it from the first sample")
    # with grad_accum > 1: each optimizer step's samples cut into micro-batches by token count, not in stream order,
    # so each pads to a length near its own; the same samples make each step, so the loss and gradients are the
    # same up to fp32 summation order (the adapters' dropout masks fall on other samples). Hugging Face's
    # group_by_length regroups across steps (another order of training); this keeps the reference's order of steps
    sort_step_by_length: bool = option(False, "cut each optimizer step's samples into micro-batches by length")
    # a micro-batch is right-padded, so under causal attention no real token sees a padded one: without the mask
    # every real token's output (and so the loss and gradients) is the same, and sdpa runs its causal flash kernel
    # instead of a kernel that reads a (B, 1, T, T) mask; the padded positions' own outputs differ and are unused
    padding_mask: bool = option(True, "mask a padded micro-batch's padding in the language model's attention "
                                      "(false: causal attention only, the same output at every real token)")
    # several samples in one row per micro-batch, each with its own rope positions, attention kept within a sample
    packing: bool = option(False, "concatenate a micro-batch's samples into one row (no padding), attention per sample")
    # regional compilation: each decoder layer and vision block through torch.compile (trainer.model.compile_blocks),
    # the norms, activations, rope and casts between the matrix products fused into few kernels; the first steps
    # of each run compile (a minute or more), later shapes reuse or extend the compiled code
    compile: bool = option(False, "torch.compile each decoder layer and vision block (fused kernels, fewer launches)")
    # Hugging Face TrainingArguments' torch_compile_mode, for the blocks train.compile compiles. max-autotune-no-
    # cudagraphs times each matrix product against inductor's Triton templates, which can take the adapters'
    # dropout into the product's loads (inductor's prologue fusion); the first steps compile much longer. Modes
    # that replay CUDA graphs are train.cuda_graphs' job (a whole micro-batch as one graph)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = option(
        "default", "torch.compile mode of train.compile's blocks (max-autotune-no-cudagraphs: products autotuned)")
    # each anchor head with its loss through torch.compile (trainer.model.CoVTModel.compile_heads): the heads' work
    # runs eagerly otherwise, 7-9% of a 7B CoVT step over the plain one on an H100; compiled, 1.045x the eager heads
    # at micro-batch 4 in the bench on an H100 (BENCHMARKS.md)
    compile_heads: bool = option(False, "torch.compile each anchor head and its loss")
    # scipy: the reference's linear_sum_assignment on the host, which waits for the GPU at every micro-batch;
    # device: every assignment of the (at most 8) predictions tried on the GPU, the same optimum, no wait
    sam_matching: Literal["scipy", "device"] = option(
        "scipy", "where the SAM head's Hungarian matching runs: scipy on the host, or the device (no host read)")
    # each micro-batch's forward and backward recorded once per layout as a CUDA graph and replayed as one launch
    # (trainer.step_graphs): for one GPU without DeepSpeed, with sam_matching device and packing off
    cuda_graphs: bool = option(False, "replay each micro-batch's forward and backward as one CUDA graph (one GPU)")
    # few layouts for cuda_graphs: each micro-batch's tokens and text-loss positions padded up to a multiple
    pad_to_multiple_of: int = option(1, "pad each micro-batch's tokens and text-loss positions to a multiple of this")


# ------------------------------------------------------------------------- root
@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    anchors: list[str] = option(factory=lambda: ["sam", "depth", "dino"], help="VISUAL_MODEL_ID")
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------- validation
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"{_type_name(args[0])} -> {_type_name(args[1])}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, key: str) -> Any:
    """Validate ``value`` against the annotation ``tp``; ``key`` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _build_union(args, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    return _build_scalar(tp, value, key)


def _build_union(args: tuple, value: Any, key: str) -> Any:
    """``Optional[X]`` / ``X | Y``: None where allowed, else the first member the value fits."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _build(arg, value, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")


def _build_dataclass(tp: type, value: Any, key: str) -> Any:
    """A config section from a mapping: unknown keys are errors naming the known ones."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping for {tp.__name__}, got {value!r}")
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}{did_you_mean(str(unknown[0]), names, where)} "
            f"(known keys{' of ' + key if key else ''}: {sorted(names)})"
        )
    kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
    try:
        return tp(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{key or 'config'}: {e}") from None


# the reference's scripts/run.sh flags (Hugging Face TrainingArguments and its own), with their run.sh line, and
# the key that sets the same thing here: an override by such a name is answered with the key
REFERENCE_FLAGS: dict[str, tuple[int, str]] = {
    "vision_lora": (37, "train.lora.vision_tower"),
    "lora_rank": (40, "train.lora.r"),
    "lora_alpha": (41, "train.lora.alpha"),
    "lora_dropout": (42, "train.lora.dropout"),
    "model_path": (45, "model.path"),
    "data_path": (46, "data.path"),
    "image_folder": (47, "data.image_folder"),
    "bf16": (52, "train.bf16"),
    "output_dir": (55, "train.output_dir"),
    "max_steps": (56, "train.stages"),
    "per_device_train_batch_size": (57, "train.batch_size"),
    "gradient_accumulation_steps": (58, "train.grad_accum"),
    "image_resized_width": (61, "model.image_size"),
    "image_resized_height": (62, "model.image_size"),
    "learning_rate": (63, "train.lr"),
    "projection_layer_lr": (64, "train.projection_lr"),
    "weight_decay": (65, "train.weight_decay"),
    "warmup_ratio": (66, "train.warmup_ratio"),
    "lr_scheduler_type": (67, "train.lr_scheduler"),
    "logging_steps": (68, "train.log_every"),
    "tf32": (69, "train.tf32"),
    "gradient_checkpointing": (70, "train.gradient_checkpointing"),
    "save_steps": (73, "train.save_every"),
    "save_total_limit": (74, "train.save_total_limit"),
    "dataloader_num_workers": (75, "train.num_workers"),
    "deepspeed": (76, "train.deepspeed"),
    "report_to": (77, "train.report_to"),
    "run_name": (78, "train.run_name"),
    "anchor_model_id": (79, "anchors"),
    "stage_0_step": (81, "train.stages"),
    "stage_1_step": (82, "train.stages"),
    "stage_2_step": (83, "train.stages"),
}


def did_you_mean(name: str, known: set[str], prefix: str = "") -> str:
    """'; did you mean train.lr?': the key of a flag of the reference's run.sh, else the closest known key
    (difflib), or '' when none is close."""
    if name in REFERENCE_FLAGS:
        line, key = REFERENCE_FLAGS[name]
        return f"; did you mean {key}? (the reference's --{name}, scripts/run.sh {line})"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _build_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is float:
        # PyYAML (YAML 1.1) reads 1e-4 as a string; accept it as the number it is written as
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return parsed


# ------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = option(False, "the low end itself is excluded")
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if value != value or value in (float("inf"), float("-inf")):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, AT_LEAST_1, AT_LEAST_0, UNIT = Range(0, low_open=True), Range(1), Range(0), Range(0, 1)
# Every numeric field's range, by dotted key ([i]: any list item, NAME: any mapping value); a numeric
# field missing here fails tests/test_config.py.
RANGES: dict[str, Range] = {
    "data.limit": AT_LEAST_1,
    "data.subset.size": AT_LEAST_1,
    "data.subset.seed": AT_LEAST_0,
    "data.validation": AT_LEAST_1,
    "cache.shard_size": AT_LEAST_1,
    "cache.codec_max_error": POSITIVE,
    "cache.local_max_gb": POSITIVE,
    "precompute.batch_size": AT_LEAST_1,
    "precompute.num_workers": AT_LEAST_0,
    "precompute.checkpoints.NAME.random_init_seed": AT_LEAST_0,
    "precompute.checkpoints.NAME.input_size": Range(8),  # PIDINet pools three times
    "precompute.sam.points_per_side": AT_LEAST_1,
    "precompute.sam.max_masks": AT_LEAST_1,
    "precompute.sam.pred_iou_thresh": UNIT,
    "precompute.sam.stability_score_thresh": UNIT,
    "precompute.sam.box_nms_thresh": UNIT,
    "precompute.sam.point_batch_size": AT_LEAST_1,
    "model.image_size": Range(28),  # one 2x2 group of 14-pixel patches
    "train.stages[i].steps": AT_LEAST_1,
    "train.stages[i].anchor_losses_off_from": AT_LEAST_0,
    "train.lora.r": AT_LEAST_1,
    "train.lora.alpha": POSITIVE,
    "train.lora.dropout": Range(0, 1, high_open=True),
    "train.loss_weights.NAME": AT_LEAST_0,
    "train.lr": POSITIVE,
    "train.projection_lr": POSITIVE,
    "train.weight_decay": AT_LEAST_0,
    "train.adam_beta1": Range(0, 1, high_open=True),
    "train.adam_beta2": Range(0, 1, high_open=True),
    "train.adam_epsilon": POSITIVE,
    "train.warmup_ratio": Range(0, 1, high_open=True),
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.global_batch": AT_LEAST_1,
    "train.max_length": AT_LEAST_1,
    "train.pad_to_multiple_of": AT_LEAST_1,
    "train.num_workers": AT_LEAST_0,
    "train.save_every": AT_LEAST_0,
    "train.save_total_limit": AT_LEAST_1,
    "train.log_every": AT_LEAST_0,
    "train.seed": AT_LEAST_0,
    "train.plain_answer_fraction": UNIT,
    "train.max_nonfinite_steps": AT_LEAST_1,
    "train.collective_timeout_minutes": POSITIVE,
    "train.validate_every": AT_LEAST_0,
    "train.max_grad_norm": AT_LEAST_0,
}


def _numbers(node: Any, key: str, pattern: str):
    """(dotted key, RANGES pattern, value) of every int/float value in a built config."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            dot = "." if key else ""
            yield from _numbers(getattr(node, f.name), f"{key}{dot}{f.name}", f"{pattern}{dot}{f.name}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _numbers(item, f"{key}[{i}]", f"{pattern}[i]")
    elif isinstance(node, dict):
        for name, item in node.items():
            yield from _numbers(item, f"{key}.{name}", f"{pattern}.NAME")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, pattern, node


def check_ranges(cfg: Config) -> None:
    for key, pattern, value in _numbers(cfg, "", ""):
        allowed = RANGES.get(pattern)
        if allowed is not None and not allowed.holds(value):
            raise ConfigError(f"{key}: {value!r} is out of range (must be {allowed})")


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree or {}, "")
    check_ranges(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply ``key.sub=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    from covt.anchors import ANCHORS  # late import: anchors imports nothing from here

    for name in cfg.anchors:
        if name not in ANCHORS:
            raise ConfigError(f"anchors: unknown anchor {name!r} (known: {list(ANCHORS)})")
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (every key, defaults included); ``load_config`` reads it back to ``cfg``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=120)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``config_yaml(cfg)`` to ``path`` atomically (a run folder keeps the config it ran with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, config_yaml(cfg).encode())
    return path


def add_config_arguments(parser) -> None:
    """The ``--config FILE key.sub=value ...`` arguments every entry point takes; ``--help`` lists the keys."""
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value (keys below)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the key list's lines
    keys = "config keys (in the YAML file, or as overrides key.sub=value):\n" + reference_text()
    parser.epilog = f"{parser.epilog}\n\n{keys}" if parser.epilog else keys


def config_from_args(args) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


# ------------------------------------------------------------------ reference
def config_keys(cls: type = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) of every leaf field of the config, sections flattened."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            default = repr(value) if not dataclasses.is_dataclass(value) else "…"
        else:
            default = "(required)"
        keys.append((key, _type_name(tp).replace("covt.config.", ""), default, f.metadata.get("help", "")))
        args = typing.get_args(tp)
        item = args[-1] if typing.get_origin(tp) in (list, dict) and args else None
        if item is not None and dataclasses.is_dataclass(item):
            keys += config_keys(item, f"{key}{'[i]' if typing.get_origin(tp) is list else '.NAME'}.")
    return keys


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"train.lora.r": 16, ...}`` of a nested config dict (``dataclasses.asdict`` of a Config, or its YAML)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def reference_markdown() -> str:
    """The config reference tables of the README, generated from the dataclasses and REFERENCE_FLAGS above."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, meaning in config_keys():
        type_name, meaning = (text.replace("|", "\\|") for text in (type_name, meaning))
        rows.append(f"| `{key}` | {type_name} | `{default}` | {meaning} |")
    rows += ["", "The reference's `scripts/run.sh` flags and the keys that set the same here (an override named like "
             "the flag is answered with its key):", "", "| flag | `run.sh` line | key |", "|---|---|---|"]
    rows += [f"| `--{flag}` | {line} | `{key}` |" for flag, (line, key) in REFERENCE_FLAGS.items()]
    return "\n".join(rows)


def reference_text() -> str:
    """The config keys for ``--help``: one line each, key, type and default, then the help indented."""
    return "\n".join(f"  {key} ({type_name}; default {default})\n      {meaning}"
                     for key, type_name, default, meaning in config_keys())


if __name__ == "__main__":
    print(reference_markdown())
