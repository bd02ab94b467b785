"""Training throughput at the recipe's global batch: CoVT vs plain LoRA, per micro-batch size, side by side.

Builds a Qwen2.5-VL-7B-sized model with RANDOM weights from a Qwen2_5_VLConfig with the real
7B dimensions, directly on the GPU in bf16 (nothing is downloaded), with the recipe's LoRA
(r16/alpha 32/dropout 0.01 on the LLM and vision tower), trainable thought-token rows and the
sam/depth/dino heads consuming synthetic targets of the real cached shapes (SAM embedding
256x64x64 + 8 masks 256x256 through a ViT-H-sized frozen mask decoder, Depth Anything ViT-L
4x1369x1024 + 256x256 depth, DINOv2 ViT-L 1025x1024).

One timed step = one optimizer step over a global batch of 8 samples (448x448 image, ~300
text tokens each, lengths varying +-20%), cut into micro-batches of 1, 2, 4 or 8 with
gradient accumulation: host->device copies, forwards, backwards, clipping, AdamW, as
trainer/train.py runs it (bf16 autocast). Kinds of step on the same model and batches,
alternating after warm-up, timed with CUDA events (medians):

  library: transformers' loss from full logits and its per-window sdpa vision attention
           (a LoRA fine-tune as usually written; what this trainer did before issue 9);
  plain:   this trainer's text loss (logits at labelled positions only) and varlen vision
           attention, anchor losses off: a plain LoRA fine-tune through the same code;
  covt:    plain + the three anchor heads and their losses.
  covt_bf16_inputs: covt with train.lora.fp32_inputs false (no fp32 copies of the adapters' inputs).
  covt_compiled: covt with train.compile (each decoder layer and vision block through torch.compile; the
           other kinds run the same blocks eagerly, torch.compiler.set_stance("force_eager")).
  covt_bf16_inputs_compiled: both.
  any kind + _fused: the same with train.optim adamw_torch_fused (torch's fused AdamW) instead of the
           reference's adamw_torch (multi-tensor); each has its own optimizer over the same parameters.
  any kind + _device_matching: the same with train.sam_matching device (the SAM head's Hungarian matching on the
           GPU, no read back to the host) instead of scipy's on the host.
  any kind + _graphed: each micro-batch's forward and backward replayed as one CUDA graph, recorded once per
           batch layout (trainer.step_graphs; CUDA only, needs _device_matching for CoVT kinds); first prints the
           loss and gradient differences of a replay against the same micro-batch run directly. Their peak memory
           adds the graphs' pool (where a replay's activations live) to the step's own peak.
  any kind + _recomputed_dropout: the same with train.lora.recompute_dropout (each adapter's dropout made again in
           the backward pass instead of its dropped input and mask kept: the same masks, less memory).
  any kind + _compiled_heads: the same with train.compile_heads (each anchor head and its loss through
           torch.compile; with _compiled in the kind's name the blocks are compiled too).
  any kind + _peft_token_rows: the same with train.lora.separate_token_rows false (peft's trainable-token layers:
           the whole embedding and lm_head copied with the thought-token rows written in at every forward, and the
           whole matrices' gradients made in the backward).
  any kind + _split_k: the same with train.lora.split_k (the adapters' 16-wide products with their reductions cut
           into batched slices summed in fp32: more GEMM tiles for the same products).
  any kind + _causal_only: the same with train.padding_mask false (a padded micro-batch's text attention causal
           only, with no mask over its right padding: the same output at every real token).
  any kind + _model_indices: the same with the batches stripped of what the loader computes for the model
           (trainer/host_inputs.py: rope positions, vision indices, image token places, packed boundaries), which
           the model then computes itself at each forward, reading them back from the GPU (the code before them).

    python bench/bench_train_step.py                       # H100: the 7B model
    python bench/bench_train_step.py --device cpu --tiny --micro-batch 1,4 --checkpointing on   # smoke test

Per layout and kind it also reports the FLOPs of one optimizer step (torch's FlopCounterMode, counted once on a
real step), the achieved TFLOP/s at the median step time and the MFU against the dense matmul rate measured in
the same process (bf16 8192^3 on CUDA, fp32 1024^3 on the CPU); and the model MFU, the same with the FLOPs of the
global batch's samples without padding (each its own micro-batch of one, counted once per kind): padded tokens'
work, which --pad-to-multiple-of adds, is not the model's; with --profile, the busy time of one step (kernel
time on CUDA, operator time on the CPU) over the median step time and the share of matrix products in it.
``--packing off,on`` times padded micro-batches and packed ones (train.packing: one row per micro-batch), and
first prints the relative loss and gradient differences of one micro-batch packed vs padded on this device.
``--count-reads`` counts, per kind, the operators of one micro-batch's forward and backward that read a device
value back to the host (each of which, on CUDA, waits for the GPU): 0 with the loader's inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch._dynamo import config as dynamo_config
from torch.profiler import record_function
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covt.anchors import array_shape, get_anchor  # noqa: E402
from covt.compute import autocast  # noqa: E402
from covt.config import STAGE_NAMES, Config, LoraConfig, StageConfig, TrainConfig  # noqa: E402
from covt.images import open_rgb  # noqa: E402
from trainer.batch import batch_to, build_batch, pinned  # noqa: E402
from trainer.heads import CacheDims, build_heads  # noqa: E402
from trainer.host_inputs import without_host_inputs  # noqa: E402
from trainer.lora import (  # noqa: E402
    adapter_layers,
    attach_lora,
    cast_adapter_inputs,
    replace_adapter_dropout,
    trainable_summary,
    use_separate_token_rows,
    use_split_k,
)
from trainer.model import (  # noqa: E402
    CUDA_GRAPH_MODES,
    CoVTModel,
    compile_blocks,
    keep_gradients,
    repeated_blocks,
    unwrap_vlm,
    vlm_inputs,
)
from trainer.optim import make_optimizer  # noqa: E402
from trainer.settings import BatchSettings  # noqa: E402
from trainer.step_graphs import MicroBatchGraphs  # noqa: E402
from trainer.text_attention import use_packed_text_attention  # noqa: E402
from trainer.tiny_model import build_processor, build_tokenizer, tiny_config  # noqa: E402
from trainer.tokens import add_thought_tokens  # noqa: E402
from trainer.train import clip_norm, free_memory, graphed_micro_batch  # noqa: E402
from trainer.vision_attention import VISION_ATTENTION, use_varlen_vision_attention, varlen_kernel_available  # noqa: E402

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


FILLER = ("The scene shows the objects described in the question, with their colours, sizes and positions "
          "relative to one another, and the answer follows from what is visible. ")


def samples(n: int, targets: dict, text_tokens: int, tokenizer) -> list[dict]:
    """``n`` samples cycling over data/sample, each first answer lengthened with filler text to
    ``text_tokens`` x (0.8 .. 1.2) text tokens (counted by ``tokenizer``) so that lengths differ as in real
    data (micro-batches are padded)."""
    records = json.loads((REPO / "data/sample/conversations.json").read_text())
    filler = FILLER.split()
    out = []
    for i in range(n):
        record = records[i % len(records)]
        image_bytes = (REPO / "data/sample/images" / record["image"]).read_bytes()
        conversations = [dict(t) for t in record["conversations"][:2]]
        wanted = int(text_tokens * (0.8 + 0.4 * (i % 8) / 7))
        answer, words = conversations[1]["value"], 0
        question = conversations[0]["value"]
        while len(tokenizer(f"{question} {answer}", add_special_tokens=False).input_ids) < wanted:
            answer += " " + filler[words % len(filler)]
            words += 1
        conversations[1]["value"] = answer
        out.append({"index": i, "key": f"{record['id']}-{i}", "id": record["id"], "conversations": conversations,
                    "images": [open_rgb(image_bytes)], "image_bytes": [image_bytes], "targets": targets})
    return out


def blocks_compiled(kind: str) -> bool:
    """Whether ``kind`` runs train.compile's compiled blocks (``_compiled``, not only ``_compiled_heads``)."""
    return "_compiled" in kind.replace("_compiled_heads", "")


def compiled_kind(kind: str) -> bool:
    """Whether ``kind`` runs any compiled code (its blocks or its heads)."""
    return blocks_compiled(kind) or "_compiled_heads" in kind


def make_step(model: CoVTModel, optimizers: dict, batches: list[dict], device: torch.device, kind: str, bf16: bool,
              cuda_graphs: bool = False):
    """One optimizer step over a global batch given as micro-batches, as trainer/train.py runs it.

    kind: ``covt`` (text + anchor losses), ``plain`` (the same model and text loss, no anchor losses: a plain
    LoRA fine-tune through the same code), ``library`` (transformers' own loss from full logits and its
    per-window sdpa vision attention: a LoRA fine-tune as usually written, the "before" of issue 9),
    ``covt_bf16_inputs`` (covt with train.lora.fp32_inputs false: the adapters take the bf16 activations uncast),
    ``covt_compiled`` / ``covt_bf16_inputs_compiled`` (the same with train.compile's compiled blocks; every other
    kind runs those blocks eagerly). ``cuda_graphs``: the blocks replay CUDA graphs (``--compile-mode
    reduce-overhead``), so the step keeps its gradients between micro-batches (trainer.model.keep_gradients).
    """
    if "_graphed" in kind and "_recomputed_dropout" in kind:
        raise ValueError(f"{kind}: the recomputed dropout has not run inside a CUDA graph (trainer.step_graphs)")
    if "_model_indices" in kind:
        batches = [without_host_inputs(b) for b in batches]
    optimizer = optimizers["adamw_torch_fused" if "_fused" in kind else "adamw_torch"]
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    visual = unwrap_vlm(model.vlm).model.visual
    adapters = adapter_layers(model.vlm)  # found once: the timed step only sets their flag
    graphs = MicroBatchGraphs(functools.partial(graphed_micro_batch, model, len(batches),
                                                functools.partial(autocast, device, bf16)),
                              trainable, device) if "_graphed" in kind else None

    def step(eager: bool = False, reads: DeviceReads | None = None) -> None:
        """``eager``: the same step with the compiled blocks run eagerly (the FLOP counter sees no compiled kernel);
        ``reads``: only the first micro-batch's forward and backward, eagerly, under that census (no update)."""
        with torch.compiler.set_stance("default" if compiled_kind(kind) and not eager and reads is None
                                       else "force_eager"):
            micro_batches(reads, eager)

    def micro_batches(reads: DeviceReads | None, eager: bool) -> None:
        visual.config._attn_implementation = "sdpa" if kind == "library" else VISION_ATTENTION
        cast_adapter_inputs(adapters, "bf16_inputs" not in kind)
        replace_adapter_dropout(adapters, "_recomputed_dropout" in kind)
        use_separate_token_rows(model.vlm, "_peft_token_rows" not in kind)
        use_split_k(adapters, "_split_k" in kind)
        model.heads["sam"].matching = "device" if "_device_matching" in kind else "scipy"
        model.compile_heads("_compiled_heads" in kind)
        model.padding_mask = "_causal_only" not in kind
        if cuda_graphs:
            keep_gradients(trainable)
        replay = graphs is not None and not eager and reads is None
        for cpu_batch in batches if replay else []:
            with record_function(STEP_PARTS[0]):  # forward and backward: one replay
                graphs(cpu_batch, kind.startswith("covt"))
        for cpu_batch in [] if replay else batches[:1] if reads is not None else batches:
            batch = batch_to(cpu_batch, device)
            torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: a new micro-batch
            with autocast(device, bf16), reads or contextlib.nullcontext():
                with record_function(STEP_PARTS[0]):
                    if kind == "library":
                        loss = model.vlm(**vlm_inputs(model.vlm, batch, labels=True), use_cache=False).loss
                    else:
                        loss = model(batch, anchor_losses=kind.startswith("covt"))["loss"]
                with record_function(STEP_PARTS[1]):
                    (loss / len(batches)).backward()
        if reads is None:
            with record_function(STEP_PARTS[2]):
                torch.nn.utils.clip_grad_norm_(trainable, clip_norm(TrainConfig()))
                optimizer.step()
        # the graphed kinds too: each kind's graphs own other gradient tensors and install theirs when none are set
        optimizer.zero_grad(set_to_none=not cuda_graphs)

    step.graphs = graphs
    return step


def plain_twin(kind: str) -> str | None:
    """The kind a CoVT kind's time is divided by for CoVT/plain: the plain step at the same settings (a plain step
    has no anchor heads, so no SAM matching to place); None for a kind that is not CoVT."""
    if not kind.startswith("covt"):
        return None
    return "plain" + kind.removeprefix("covt").replace("_device_matching", "")


# the parts of a step whose host time --profile reports (the time the host spends issuing them, on CUDA)
STEP_PARTS = ("step.forward", "step.backward", "step.clip_and_optimizer")


# operators that need a device value on the host: on CUDA each one waits for the GPU to finish what came before
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
              "aten.repeat_interleave.Tensor", "aten.equal", "aten.is_nonzero")


class DeviceReads(TorchDispatchMode):
    """Counts the operators that read a value of the model's tensors back to the host: :data:`HOST_READS`,
    indexing with a boolean mask (a ``nonzero``) and copies from the GPU to the host. On the CPU it counts what
    would read the GPU on CUDA (a ``.tolist()`` does not pass through the dispatcher and is not seen)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = str(func), kwargs or {}
        masks = args[1] if name.startswith("aten.index.Tensor") and len(args) > 1 else ()
        to_host = (name.startswith("aten._to_copy") and str(kwargs.get("device")) == "cpu"
                   and isinstance(args[0], torch.Tensor) and args[0].is_cuda)
        if name.startswith(HOST_READS) or to_host or any(m is not None and m.dtype == torch.bool for m in masks):
            self.count += 1
        return func(*args, **kwargs)


def device_reads(step) -> int:
    """How many times one micro-batch's forward and backward of ``step`` (a :func:`make_step`) reads the device."""
    reads = DeviceReads()
    step(reads=reads)
    return reads.count


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


def profile(step, name: str, device: torch.device) -> dict[str, float]:
    """Top operators (self device time, then self CPU time) of one step, printed; returns the busy time of the
    step (ms of kernel time on CUDA, of operator time on the CPU), the share of it in matrix products, the host
    time of each of :data:`STEP_PARTS` (on CUDA the time the host takes to issue that part's work), and where the
    time goes (:func:`matmul_split`, :func:`kernel_classes`). Shapes are recorded, which adds host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    split = {**matmul_split(prof.key_averages(group_by_input_shape=True), device), **kernel_classes(averages, device)}
    print(f"--- where one {name} step's {'kernel' if device.type == 'cuda' else 'operator'} time goes (ms): "
          + ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in split.items()))
    for key in ("self_cuda_time_total", "self_cpu_time_total") if device.type == "cuda" else ("self_cpu_time_total",):
        print(f"--- profile of one {name} step, by {key}")
        print(averages.table(sort_by=key, row_limit=12, max_name_column_width=60))
    host: dict[str, float] = {}
    for e in averages:  # on CUDA each part also has a device-side row, with no host time: keep the host's
        if e.key in STEP_PARTS:
            host[e.key] = max(host.get(e.key, 0.0), e.cpu_time_total / 1000)
    print(f"--- host time of one {name} step (ms, under the profiler): "
          + ", ".join(f"{part} {host.get(part, 0.0):.1f}" for part in STEP_PARTS))
    return {**busy_time(averages, device), "host_ms": host, "split_ms": split}


def matmul_split(by_shape, device: torch.device) -> dict[str, float]:
    """Time (ms) of the matrix-product operators with a side no wider than the adapters' rank (LoRA's thin
    products, and the heads' few-row ones), and of the others: from a profile grouped by input shape. Inside a
    replayed CUDA graph no operator is recorded: both are 0 there."""
    thin = wide = 0.0
    for e in by_shape:
        if e.key not in GEMM_OPS:
            continue
        sides = [side for shape in e.input_shapes if len(shape) >= 2 for side in shape[-2:]]
        spent = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if sides and min(sides) <= LoraConfig().r:
            thin += spent
        else:
            wide += spent
    return {"thin_matmul_ms": thin / 1000, "wide_matmul_ms": wide / 1000}


def kernel_events(averages) -> list:
    """The kernels of a CUDA profile's averages: device rows, not the device side of a user annotation (a
    ``record_function`` range, which spans its kernels)."""
    from torch.autograd import DeviceType

    return [e for e in averages if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def kernel_classes(averages, device: torch.device) -> dict[str, float]:
    """Kernel time (ms) per class of kernel, told apart by name (CUDA only: a replayed graph's kernels too)."""
    if device.type != "cuda":
        return {}
    spent = dict.fromkeys([f"{name}_ms" for name, _ in KERNEL_CLASSES] + ["other_ms"], 0.0)
    for e in kernel_events(averages):
        name = e.key.lower()
        group = next((label for label, parts in KERNEL_CLASSES if any(part in name for part in parts)), "other")
        spent[f"{group}_ms"] += e.self_device_time_total / 1000
    return spent


def busy_time(averages, device: torch.device) -> dict[str, float]:
    """Kernel time (CUDA; operator time on the CPU) of a profile, summed as the profiler's own table footer sums
    it (on CUDA: the kernel events, each counted once), and the share of it in matrix-product operators."""
    if device.type == "cuda":
        kernels = kernel_events(averages)
        busy = sum(e.self_device_time_total for e in kernels)  # microseconds
        gemm = sum(e.self_device_time_total for e in averages if e.key in GEMM_OPS)  # the operators' kernels
        if not gemm:  # a replayed CUDA graph launches kernels with no operator above them: told apart by name
            gemm = kernel_classes(averages, device)["matmul_ms"] * 1000
    else:
        busy = sum(e.self_cpu_time_total for e in averages)
        gemm = sum(e.self_cpu_time_total for e in averages if e.key in GEMM_OPS)
    # forward calls of compiled regions (train.compile's blocks): none where a block fell back to eager
    compiled = sum(e.count for e in averages if e.key == "CompiledFunction")
    return {"busy_ms": busy / 1000, "gemm_share": gemm / busy if busy else 0.0, "compiled_calls": compiled}


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::_scaled_mm"}
# cuBLAS's and CUTLASS's matrix-product kernels on sm90 (nvjet_sm90_tst_..., sm90_xmma_gemm_..., cutlass3x_...)
GEMM_KERNEL_NAMES = ("nvjet", "gemm", "cutlass", "xmma")
# kernel classes by name, the first that matches (attention before matrix products: some fused attention kernels
# are CUTLASS's)
KERNEL_CLASSES = (("attention", ("flash", "fmha", "sdpa", "attention")), ("matmul", GEMM_KERNEL_NAMES),
                  ("inductor", ("triton_",)), ("copy", ("copy", "memcpy", "memset")),
                  ("elementwise", ("elementwise", "vectorized", "unrolled")), ("reduction", ("reduce",)))


def grouped_query_sdpa_flops() -> dict:
    """FlopCounterMode formulas for the fused SDPA kernels that also count grouped-query calls (``enable_gqa``:
    fewer key/value heads than query heads, what transformers passes where a micro-batch has no padding), on which
    the formulas of the device's torch 2.11 assert: each key/value head counts once per query head it serves."""
    from torch.utils import flop_counter

    def per_query_head(query: tuple, kv: tuple) -> tuple:
        return (kv[0], query[1], *kv[2:])

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, per_query_head(query, key), per_query_head(query, value))

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, per_query_head(query, key),
                                                     per_query_head(query, value))

    aten = torch.ops.aten
    kernels = ("efficient", "flash", "cudnn")
    return {**{getattr(aten, f"_scaled_dot_product_{k}_attention"): forward for k in kernels},
            **{getattr(aten, f"_scaled_dot_product_{k}_attention_backward"): backward for k in kernels}}


def count_flops(step) -> int:
    """Floating-point operations of one real step as torch's FlopCounterMode counts them (matrix products,
    convolutions, attention; a recomputed forward under activation checkpointing counts again)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False, custom_mapping=grouped_query_sdpa_flops()) as counter:
            step(eager=True)  # compiled kernels bypass the counter: count the eager run of the same function
    except torch.OutOfMemoryError:  # the eager step holds more than the compiled one: keep its activations on
        free_memory()               # the host for the count (the same operators, so the same FLOPs)
        with torch.autograd.graph.save_on_cpu(), FlopCounterMode(
                display=False, custom_mapping=grouped_query_sdpa_flops()) as counter:
            step(eager=True)
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """Dense matrix-product rate (FLOP/s) of this process on ``device``: bf16 8192^3 on CUDA, a smaller fp32
    size on the CPU (seconds, not minutes); the denominator of MFU. Returns (rate, size)."""
    size, repeats = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def products() -> None:
        for _ in range(repeats):
            torch.mm(a, b)

    products()  # warm-up
    ms, _ = timed(products, device)
    return 2 * size**3 * repeats / (ms / 1000), size


def build_model(config, tokens, dims, decoders: Path, device: torch.device, dtype: torch.dtype,
                compile_mode: str | None = None) -> CoVTModel:
    vlm = build_vlm(config, device, dtype, grad_ckpt=False)
    if tokens.ids and max(tokens.ids) >= vlm.get_input_embeddings().weight.shape[0]:
        vlm.resize_token_embeddings(max(tokens.ids) + 1, mean_resizing=False)
    use_varlen_vision_attention(vlm)
    use_packed_text_attention(vlm)  # rows that are not packed keep sdpa: the padded layouts are unchanged
    vlm = attach_lora(vlm, LoraConfig(), tokens.ids)  # the recipe's r16 / alpha 32 / dropout 0.01
    compile_blocks(vlm, compile_mode)  # compiles at the first call of a *_compiled kind; the others run them eagerly
    heads = build_heads(ANCHORS, config.text_config.hidden_size, CacheDims(dims, decoders))
    return CoVTModel(vlm, heads, tokens).to(device).train()


def compare_vision_attention(model: CoVTModel, batch: dict, device: torch.device) -> dict[str, float]:
    """Relative L2 error of the vision tower's output with varlen and with sdpa attention (model dtype), each
    against an fp32 copy of the tower with sdpa: the varlen kernel should err no more than sdpa does."""
    import copy

    visual = unwrap_vlm(model.vlm).model.visual
    pixels, grid = batch["pixel_values"].to(device), batch["image_grid_thw"].to(device)
    reference = copy.deepcopy(visual).float()
    reference.config = copy.copy(visual.config)
    reference.config._attn_implementation = "sdpa"
    errors = {}
    with torch.no_grad():
        exact = reference(pixels.float(), grid_thw=grid).pooler_output
        del reference
        for name in ("sdpa", VISION_ATTENTION):
            visual.config._attn_implementation = name
            out = visual(pixels.to(visual.dtype), grid_thw=grid).pooler_output.float()
            errors[name] = float((out - exact).norm() / exact.norm())
    visual.config._attn_implementation = VISION_ATTENTION
    return errors


def loss_and_gradient(model: CoVTModel, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The CoVT loss of one micro-batch and the trainable parameters' gradient (all of them, as one vector)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    with autocast(device, device.type == "cuda"):
        loss = model(batch_to(batch, device), anchor_losses=True)["loss"]
    loss.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in trainable])
    return loss.detach().float(), grad


def relative_differences(reference: tuple[torch.Tensor, torch.Tensor],
                         other: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    (loss_a, grad_a), (loss_b, grad_b) = reference, other
    return {"loss_rel": float((loss_b - loss_a).abs() / loss_a.abs()),
            "grad_rel": float((grad_b - grad_a).norm() / grad_a.norm())}


def compare_packing(model: CoVTModel, padded: dict, packed: dict, device: torch.device) -> dict[str, float]:
    """Relative differences of the CoVT loss and of the trainable parameters' gradient between one micro-batch
    padded and the same samples packed, in this run's dtype, dropout off (the exactness of train.packing on this
    device; the CPU tests bound it in fp32)."""
    model.eval()  # no dropout: both passes compute the same function
    try:
        return relative_differences(*(loss_and_gradient(model, batch, device) for batch in (padded, packed)))
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


def compare_causal_only(model: CoVTModel, padded: dict, device: torch.device) -> dict[str, float]:
    """The same for train.padding_mask false against the mask, on one right-padded micro-batch; and of two runs
    with the mask (``grad_rel_masked``: the spread of the backward's atomic sums, the floor to read it against)."""
    model.eval()
    try:
        masked = loss_and_gradient(model, padded, device)
        model.padding_mask = False
        causal = loss_and_gradient(model, padded, device)
        model.padding_mask = True
        again = loss_and_gradient(model, padded, device)
    finally:
        model.padding_mask = True
        model.zero_grad(set_to_none=True)
        model.train()
    return {**relative_differences(masked, causal), "grad_rel_masked": relative_differences(masked, again)["grad_rel"]}


def compared_eagerly(model: CoVTModel, what: str, compare) -> dict[str, float]:
    """``compare()`` with the blocks run eagerly, or {} where that eager step does not fit the GPU (said so: the
    compiled step of the same micro-batch may still fit)."""
    try:
        with torch.compiler.set_stance("force_eager"):
            return compare()
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        free_memory()
        print(f"{what}: not compared (out of GPU memory in eager mode)")
        return {}


def report_causal_only(model: CoVTModel, padded: dict, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Prints and returns :func:`compare_causal_only` for the run's ``_causal_only`` kinds ({} where the
    micro-batch has no padding, or the eager step does not fit)."""
    micro = int(padded["input_ids"].shape[0])
    if not padded["has_padding"]:
        print(f"causal only vs masked: the micro-batch of {micro} has no padding, nothing to compare")
        return {}
    found = compared_eagerly(model, f"causal only vs masked micro-batch of {micro}",
                             lambda: compare_causal_only(model, padded, device))
    if not found:
        return {}
    print(f"causal text attention (train.padding_mask false) vs masked, micro-batch of {micro}, {dtype}, dropout "
          f"off: loss {found['loss_rel']:.2e}, gradient {found['grad_rel']:.2e} relative difference (two masked "
          f"runs: gradient {found['grad_rel_masked']:.2e})")
    return found


def host_syncs(fn, device: torch.device) -> tuple:
    """``fn()`` under torch's CUDA sync debug mode (on CUDA): its result and, for each operation that made the host
    wait for the GPU (a read, a copy from pageable memory), where it was issued: the innermost frames outside torch
    (warnings that are not torch's sync warnings are dropped)."""
    places: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/torch/" not in f.filename and Path(f.filename).name != "warnings.py"]
            if frames[-1].name == "host_syncs":  # turning the debug mode on warns once itself
                return
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
            places.append(f"{Path(filename).name}:{lineno} (from {where})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return result, list(dict.fromkeys(places))


def compare_graphed(model: CoVTModel, cpu_batch: dict, device: torch.device) -> dict[str, float]:
    """Relative differences of the CoVT loss and gradients of one micro-batch recorded as a CUDA graph and
    replayed (trainer.step_graphs), against the same forward and backward run directly; and of two direct runs
    (``grad_rel_direct``: the spread of the backward's atomic sums, the floor the replay is read against). Dropout
    off throughout, as a replay draws other masks than a direct run. Prints the host syncs of a direct run after a
    first one (which makes the one-time device caches: token rows' index, the frozen decoders, the match orders)."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    rates = [m.p for m in dropouts]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.heads["sam"].matching = "device"  # the host's matching would read the GPU inside the capture
    run = functools.partial(graphed_micro_batch, model, 1, functools.partial(autocast, device, True))
    batch = batch_to(cpu_batch, device)

    def direct(census: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss, syncs = host_syncs(lambda: run(batch, True)["loss"], device if census else torch.device("cpu"))
        for where in syncs:
            print(f"  host sync at {where}", flush=True)
        return loss, torch.cat([p.grad.flatten().float() for p in trainable if p.grad is not None])

    try:
        for m in dropouts:
            m.p = 0.0
        direct()
        print("host syncs of a micro-batch's forward and backward (each would stop a capture), listed below:",
              flush=True)
        loss, expected = direct(census=True)
        again = direct()[1]
        model.zero_grad(set_to_none=True)
        replayed = MicroBatchGraphs(run, trainable, device)(cpu_batch, True)["loss"]
        got = torch.cat([p.grad.flatten().float() for p in trainable if p.grad is not None])
        return {"loss_rel": float((replayed - loss).abs() / loss.abs()),
                "grad_rel": float((got - expected).norm() / expected.norm()),
                "grad_rel_direct": float((again - expected).norm() / expected.norm())}
    finally:
        for m, rate in zip(dropouts, rates):
            m.p = rate
        model.zero_grad(set_to_none=True)


def set_checkpointing(model: CoVTModel, on: bool) -> None:
    base = unwrap_vlm(model.vlm)
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and targets (smoke test)")
    parser.add_argument("--micro-batch", default="1,2,4,8", help="micro-batch sizes to time (comma separated)")
    parser.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step (the recipe's 8)")
    parser.add_argument("--checkpointing", default="on,off", help="gradient checkpointing settings to time")
    parser.add_argument("--kinds", default="library,plain,covt", help="step kinds to time (see make_step)")
    parser.add_argument("--text-tokens", type=int, default=300, help="text tokens per sample, on average")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the *_compiled kinds' blocks (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=1,
                        help="train.pad_to_multiple_of: micro-batches padded to a multiple of this many tokens (fewer "
                             "layouts to record for the _graphed kinds)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps of each kind and setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stage", default="understanding", choices=STAGE_NAMES)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators of one step of each kind, report busy time per step")
    parser.add_argument("--count-reads", action="store_true",
                        help="count the device reads of one micro-batch's forward and backward of each kind")
    parser.add_argument("--packing", default="off",
                        help="train.packing settings to time (off,on: padded and packed micro-batches side by side)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    image_size = 112 if args.tiny else 448
    dims, sam_spec = (TINY_DIMS, TINY_SAM) if args.tiny else (REAL_DIMS, REAL_SAM)

    processor = build_processor(build_tokenizer(), image_size)
    tokens = add_thought_tokens(processor)  # ids stay below the 7B vocabulary: no resize needed
    config = tiny_config(processor.tokenizer) if args.tiny else qwen2_5_vl_7b_config(processor.tokenizer)
    decoders = Path(tempfile.mkdtemp(prefix="bench-decoders-"))
    write_sam_decoder(decoders, sam_spec)
    torch.manual_seed(0)
    model = build_model(config, tokens, dims, decoders, device, dtype, args.compile_mode)
    cfg = Config(anchors=list(ANCHORS))
    cfg.model.image_size = image_size
    cfg.train.max_length = 4096
    cfg.train.pad_to_multiple_of = args.pad_to_multiple_of
    # the two train.optim settings, each over every trainable parameter (states made at a kind's first step)
    optimizers = {name: make_optimizer(model, dataclasses.replace(cfg.train, optim=name))
                  for name in ("adamw_torch", "adamw_torch_fused")}
    stage = StageConfig(args.stage, 1)
    data = samples(args.global_batch, synthetic_targets(dims), args.text_tokens, processor.tokenizer)
    name = torch.cuda.get_device_name(device) if bf16 else "cpu"
    print(f"device {device} ({name}), {'tiny' if args.tiny else 'Qwen2.5-VL-7B-sized'} random weights, {dtype}, "
          f"image {image_size}x{image_size}, global batch {args.global_batch}, stage {args.stage}, heads {ANCHORS}")
    print(f"model: {trainable_summary(model)}")

    first = build_batch(data[:2], stage, True, 0, processor, tokens, BatchSettings.from_config(cfg))
    # the exactness checks run the blocks eagerly: they measure the attention paths, and compiled code made here
    # would be variants (evaluation mode) that only the checks use
    with torch.compiler.set_stance("force_eager"):
        errors = compare_vision_attention(model, first, device)
    print(f"vision tower vs fp32: sdpa {errors['sdpa']:.2e}, varlen {errors[VISION_ATTENTION]:.2e} relative error "
          f"(varlen kernel {'used' if bf16 and varlen_kernel_available() else 'not available: sdpa maths'})")
    exactness = {}
    if "on" in args.packing.split(","):
        micro = max(int(m) for m in args.micro_batch.split(","))
        both = [build_batch(data[:micro], stage, True, 0, processor, tokens,
                            dataclasses.replace(BatchSettings.from_config(cfg), packing=packing),
                            view_sizes=model.view_sizes(), vision=model.vision_geometry())
                for packing in (False, True)]
        exactness = compared_eagerly(model, f"packed vs padded micro-batch of {micro}",
                                     lambda: compare_packing(model, *both, device))
        if exactness:
            print(f"packed vs padded micro-batch of {micro}, {dtype}: loss {exactness['loss_rel']:.2e}, gradient "
                  f"{exactness['grad_rel']:.2e} relative difference")
    graph_exactness = {}
    if bf16 and any("_graphed" in k for k in args.kinds.split(",")):
        try:
            with torch.compiler.set_stance("force_eager"):
                # a micro-batch as the trainer's loader hands it over: the loader's inputs, pinned
                graph_exactness = compare_graphed(model, pinned(build_batch(
                    data[:2], stage, True, 0, processor, tokens, BatchSettings.from_config(cfg),
                    view_sizes=model.view_sizes(), vision=model.vision_geometry())), device)
            print(f"micro-batch of 2 as one CUDA graph vs run directly, {dtype}, dropout off: loss "
                  f"{graph_exactness['loss_rel']:.2e}, gradient {graph_exactness['grad_rel']:.2e} relative difference "
                  f"(two direct runs: gradient {graph_exactness['grad_rel_direct']:.2e})")
            free_memory()  # the check's graph pool
        except Exception:  # noqa: BLE001 - report why, then time the other kinds
            traceback.print_exc()
            args.kinds = ",".join(k for k in args.kinds.split(",") if "_graphed" not in k)
            print(f"ERROR: the micro-batch CUDA graph failed (above); timing the other kinds: {args.kinds}", flush=True)
            free_memory()
    causal_exactness = {}
    if any("_causal_only" in k for k in args.kinds.split(",")):
        micro = min(4, max(int(m) for m in args.micro_batch.split(",")))
        causal_exactness = report_causal_only(model, build_batch(
            data[:micro], stage, True, 0, processor, tokens, BatchSettings.from_config(cfg),
            view_sizes=model.view_sizes(), vision=model.vision_geometry()), device, dtype)
    rate, size = matmul_rate(device, dtype)
    print(f"dense matmul {size}^3 {dtype}: {rate / 1e12:.2f} TFLOP/s")
    singles = [build_batch(data[i:i + 1], stage, True, 0, processor, tokens,
                           dataclasses.replace(BatchSettings.from_config(cfg), pad_to_multiple_of=1),
                           view_sizes=model.view_sizes(), vision=model.vision_geometry())
               for i in range(args.global_batch)]
    sample_flops = unpadded_flops(model, optimizers, singles, args.kinds.split(","), device)
    print("FLOPs of the samples without padding: "
          + ", ".join(f"{kind} {flops / 1e12:.4g} TFLOP" for kind, flops in sample_flops.items()))
    rows = []
    for checkpointing in [c == "on" for c in args.checkpointing.split(",")]:
        set_checkpointing(model, checkpointing)
        layouts = [(p == "on", int(m)) for p in args.packing.split(",") for m in args.micro_batch.split(",")]
        for packing, micro in layouts:
            cfg.train.packing = packing
            batches = [build_batch(data[i:i + micro], stage, True, 0, processor, tokens, BatchSettings.from_config(cfg),
                                   view_sizes=model.view_sizes(), vision=model.vision_geometry())
                       for i in range(0, args.global_batch, micro)]
            if device.type == "cuda":  # as the trainer's DataLoader hands them over (pin_memory)
                batches = [pinned(b) for b in batches]
            row = time_layout(model, optimizers, batches, args, device, rate, sample_flops)
            del batches
            free_memory()
            if row is None:
                print(f"micro-batch {micro}, checkpointing {checkpointing}, packing {packing}: out of GPU memory",
                      flush=True)
                continue
            row = {"micro_batch": micro, "checkpointing": checkpointing, "packing": packing, **row}
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    print_table(rows, args.kinds.split(","), rate)
    result = {"device": name, "model": "tiny" if args.tiny else "qwen2.5-vl-7b-sized", "stage": args.stage,
              "global_batch": args.global_batch, "matmul_tflops": rate / 1e12, "matmul_size": size,
              "matmul_dtype": str(dtype), "sample_tflop": {k: f / 1e12 for k, f in sample_flops.items()},
              "packing_exactness": exactness, "graph_exactness": graph_exactness,
              "causal_exactness": causal_exactness,
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def unpadded_flops(model: CoVTModel, optimizers: dict, singles: list[dict], kinds: list[str],
                   device: torch.device) -> dict[str, int]:
    """Each kind's FLOPs of a step over ``singles`` (the global batch's samples, each a micro-batch of one at its
    own length): the model's work on the samples, no padded token in it."""
    flops = {}
    for kind in kinds:
        flops[kind] = count_flops(make_step(model, optimizers, singles, device, kind.replace("_graphed", ""),
                                            device.type == "cuda"))
        model.zero_grad(set_to_none=True)
    free_memory()
    return flops


def time_layout(model: CoVTModel, optimizers: dict, batches: list[dict], args, device: torch.device,
                rate: float, sample_flops: dict[str, int]) -> dict | None:
    """The columns of one layout (micro-batches of a global batch) for every kind; None when out of memory.
    ``sample_flops``: each kind's FLOPs of the samples without padding (the model MFU's numerator)."""
    bf16 = device.type == "cuda"
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    graphs = args.compile_mode in CUDA_GRAPH_MODES
    steps = {k: make_step(model, optimizers, batches, device, k, bf16, graphs) for k in args.kinds.split(",")}
    try:
        blocks = len(batches) * len(repeated_blocks(model.vlm))  # forward calls of the compiled blocks in a step
        times, peaks, flops, busy = measure(steps, args, device, f"micro-batch {len(batches[0]['keys'])}", blocks)
    except torch.OutOfMemoryError as error:
        print(f"  {str(error).splitlines()[0]}", flush=True)  # what was asked for and what was held
        model.zero_grad(set_to_none=True)
        return None
    row = {"tokens_per_sample": real / args.global_batch, "padding_fraction": 1 - real / padded}
    for kind in steps:
        row.update(kind_results(kind, times[kind], peaks[kind], flops[kind], busy.get(kind, {}), args.global_batch,
                                rate))
        row[f"{kind}_model_mfu"] = sample_flops[kind] / (row[f"{kind}_ms"] / 1000) / rate
    for kind in steps:
        if plain_twin(kind) in steps:
            row[f"{kind}_over_plain"] = row[f"{kind}_ms"] / row[f"{plain_twin(kind)}_ms"]
    if args.count_reads:
        row.update({f"{kind}_device_reads": device_reads(step) for kind, step in steps.items()})
    return row


def measure(steps: dict, args, device: torch.device, setting: str, blocks: int) -> tuple[dict, dict, dict, dict]:
    """Median-ready step times (ms), peak memory (bytes), counted FLOPs of one step and (with --profile) the
    profile's busy time, of each kind; kinds alternate after warm-up. Counting and profiling come after the
    timed steps, so that nothing they leave behind can slow those; the count comes last, after each graphed kind's
    pool is given back (it runs the step eagerly: a second activation peak)."""
    for i in range(args.warmup):  # the first compiles (and records CUDA graphs): said as it ends, for a run cut short
        for kind, step in steps.items():
            start = time.perf_counter()
            step()
            held = f", {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB reserved" if device.type == "cuda" else ""
            print(f"{setting}: warm-up step {i + 1} of {kind}: {time.perf_counter() - start:.1f} s{held}", flush=True)
    times = {k: [] for k in steps}
    peaks = {k: 0 for k in steps}
    for _ in range(args.steps):  # alternate so drift (clocks, thermals) hits all kinds alike
        for kind, step in steps.items():
            ms, peak = timed(step, device)
            times[kind].append(ms)
            peaks[kind] = max(peaks[kind], peak)
    busy = {kind: profile(step, f"{kind} {setting}", device) for kind, step in steps.items()} if args.profile else {}
    for kind, step in steps.items():  # a replay's activations live in its graphs' pool, not in the step's peak
        if step.graphs is not None:
            peaks[kind] += step.graphs.pool_bytes()
            step.graphs.release()  # the eager step counted below needs that memory (at micro-batch 4 on 80 GB)
    flops = {kind: count_flops(step) for kind, step in steps.items()}
    for kind, found in busy.items():
        if blocks_compiled(kind) and "_graphed" not in kind and found["compiled_calls"] < blocks:
            print(f"WARNING: {kind} {setting}: {found['compiled_calls']} compiled calls in a step of at least "
                  f"{blocks} block calls: blocks ran eagerly (dynamo's recompile limit?); its times are not "
                  "train.compile's", flush=True)
    return times, peaks, flops, busy


def kind_results(kind: str, times: list[float], peak: int, flops: int, busy: dict, global_batch: int,
                 rate: float) -> dict:
    """One kind's columns of a row: speed, memory, counted FLOPs, achieved rate, MFU, busy time."""
    ms = statistics.median(times)
    achieved = flops / (ms / 1000)
    out = {f"{kind}_ms": ms, f"{kind}_samples_per_s": global_batch / ms * 1000, f"{kind}_peak_gib": peak / 2**30,
           f"{kind}_tflop_per_step": flops / 1e12, f"{kind}_tflops": achieved / 1e12, f"{kind}_mfu": achieved / rate}
    if busy:
        out[f"{kind}_busy_fraction"] = busy["busy_ms"] / ms
        out[f"{kind}_gemm_share"] = busy["gemm_share"]
        out[f"{kind}_compiled_calls"] = busy["compiled_calls"]
        out.update({f"{kind}_host_ms_{part.removeprefix('step.')}": ms for part, ms in busy["host_ms"].items()})
        out.update({f"{kind}_{part}": ms for part, ms in busy["split_ms"].items()})
    return out


def print_table(rows: list[dict], kinds: list[str], rate: float) -> None:
    """One table: per layout, each kind's samples/s (peak GiB), TFLOP per step, achieved TFLOP/s, MFU against
    the measured matmul rate, model MFU (padding's FLOPs left out) and, with --profile, busy time / step (GEMM
    share of it)."""
    profiled = any(f"{k}_busy_fraction" in r for r in rows for k in kinds)
    header = ["micro-batch", "checkpointing", "packing", "padding"] + [f"{k} samples/s (GiB)" for k in kinds]
    ratios = [k for k in kinds if plain_twin(k) in kinds]
    header += [f"{k}/plain" for k in ratios] + [f"{k} {c}" for k in kinds for c in
                                ("TFLOP/step", "TFLOP/s", "MFU", "model MFU") + (("busy (GEMM)",) if profiled else ())]
    print(f"matmul rate measured in this process: {rate / 1e12:.2f} TFLOP/s (the MFU denominator)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [str(r["micro_batch"]), "on" if r["checkpointing"] else "off", "on" if r["packing"] else "off",
                 f"{r['padding_fraction']:.0%}"]
        cells += [f"{r[f'{k}_samples_per_s']:.2f} ({r[f'{k}_peak_gib']:.1f})" for k in kinds]
        cells += [f"{r[f'{k}_over_plain']:.3f}" if f"{k}_over_plain" in r else "" for k in ratios]
        for k in kinds:
            cells += [f"{r[f'{k}_tflop_per_step']:.4g}", f"{r[f'{k}_tflops']:.4g}", f"{r[f'{k}_mfu']:.1%}",
                      f"{r[f'{k}_model_mfu']:.1%}"]
            if profiled:
                cells.append(f"{r[f'{k}_busy_fraction']:.0%} ({r[f'{k}_gemm_share']:.0%})"
                             if f"{k}_busy_fraction" in r else "")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    # blocks past dynamo's recompile limit would run eagerly with only a log warning and be timed as compiled (the
    # twenty-second session's first figures of a LoRA switch since removed): a kind that gets there stops the bench
    # instead
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        main()
