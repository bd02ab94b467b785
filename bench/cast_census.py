"""Where the dtype casts of a bf16 CoVT training step come from: every cast, counted by the source line that made it.

Issue 19's profile of the 7B step on an H200 found a quarter of the GPU time in ``aten::copy_`` (about 4,700 casts
per step). This runs one forward and backward of the CoVT step (the bench's model: the recipe's LoRA, the
sam/depth/dino heads, micro-batch of 8 samples) under bf16 autocast, in eager mode, and records each
``aten._to_copy`` / ``aten.copy_`` with the innermost line of the library or project code that issued it
(autocast's casts are issued inside the operator that needs them: the line is that operator's call) and the
number of elements it copied; casts issued by the autograd engine (the backward of a forward cast) are one row.
Each census runs with ``train.lora.fp32_inputs`` true (peft's default) and false, side by side.

    python bench/cast_census.py                   # CUDA: the 7B-sized model (random weights, bf16)
    python bench/cast_census.py --device cpu      # the 7B's layer counts at tiny widths, CPU bf16 autocast

On the CPU, counts per source line are what the same code paths issue on CUDA only where the two autocast
policies agree (they differ for a few operators); the element counts scale with the widths.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train_step import (  # noqa: E402
    REAL_DIMS,
    REAL_SAM,
    TINY_DIMS,
    TINY_SAM,
    build_model,
    qwen2_5_vl_7b_config,
    samples,
    synthetic_targets,
    write_sam_decoder,
)
from covt.config import Config, StageConfig  # noqa: E402
from trainer.batch import batch_to, build_batch  # noqa: E402
from trainer.lora import adapter_layers, cast_adapter_inputs  # noqa: E402
from trainer.settings import BatchSettings  # noqa: E402
from trainer.tiny_model import TinySize, build_processor, build_tokenizer, tiny_config  # noqa: E402
from trainer.tokens import add_thought_tokens  # noqa: E402

BACKWARD = "(autograd engine: the backward of a forward cast)"
# the 7B's layer counts (28 decoder layers, 32 vision blocks, full attention every 8th) at tiny widths
SEVEN_B_DEPTHS = TinySize(hidden=64, intermediate=128, layers=28, heads=4, kv_heads=2, vision_hidden=32,
                          vision_intermediate=64, vision_depth=32, vision_heads=2)


def source_line() -> str:
    """The innermost frame of model code (below :func:`census`, not torch's own) on the current Python stack;
    none (a cast the autograd engine issues in backward, on CUDA from its own thread): :data:`BACKWARD`."""
    stack = traceback.extract_stack()[:-2]
    starts = [i for i, f in enumerate(stack) if f.name == "census" and f.filename.endswith("cast_census.py")]
    if not starts:
        return BACKWARD
    start = starts[-1]
    for frame in reversed(stack[start + 1:]):
        if "/torch/" not in frame.filename:
            short = frame.filename.split("site-packages/")[-1].split(f"{REPO}/")[-1]
            return f"{short}:{frame.lineno} {(frame.line or '').strip()}"
    return BACKWARD


class CastCensus(TorchDispatchMode):
    """Counts every cast (``aten._to_copy``, ``aten.copy_``) and the elements it wrote, by :func:`source_line`."""

    def __init__(self):
        super().__init__()
        self.casts: collections.Counter = collections.Counter()
        self.elements: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith(("aten._to_copy", "aten.copy_")):
            site = source_line()
            self.casts[site] += 1
            self.elements[site] += out.numel() if isinstance(out, torch.Tensor) else 0
        return out


def census(model, batch: dict, device: torch.device, fp32_inputs: bool) -> dict:
    """One eager forward + backward under bf16 autocast; the casts by source line, most frequent first."""
    cast_adapter_inputs(adapter_layers(model.vlm), fp32_inputs)
    counter = CastCensus()
    with torch.compiler.set_stance("force_eager"), torch.autocast(device.type, dtype=torch.bfloat16), counter:
        loss = model(batch_to(batch, device))["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    rows = [{"site": site, "casts": n, "elements": counter.elements[site]} for site, n in counter.casts.most_common()]
    return {"casts": sum(counter.casts.values()), "elements": sum(counter.elements.values()), "sites": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=15, help="source lines printed per census")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    real = device.type == "cuda"
    image_size = 448 if real else 112
    processor = build_processor(build_tokenizer(), image_size)
    tokens = add_thought_tokens(processor)
    config = (qwen2_5_vl_7b_config(processor.tokenizer) if real
              else tiny_config(processor.tokenizer, size=SEVEN_B_DEPTHS))
    if not real:
        config.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    dims, sam_spec = (REAL_DIMS, REAL_SAM) if real else (TINY_DIMS, TINY_SAM)
    decoders = Path(tempfile.mkdtemp(prefix="census-decoders-"))
    write_sam_decoder(decoders, sam_spec)
    torch.manual_seed(0)
    model = build_model(config, tokens, dims, decoders, device, torch.bfloat16)
    cfg = Config(anchors=["sam", "depth", "dino"])
    cfg.model.image_size = image_size
    cfg.train.max_length = 4096
    data = samples(args.micro_batch, synthetic_targets(dims), 300, processor.tokenizer)
    batch = build_batch(data, StageConfig("understanding", 1), True, 0, processor, tokens,
                        BatchSettings.from_config(cfg), view_sizes=model.view_sizes())
    census(model, batch, device, True)  # warm-up: lazy buffers (rope tables, masks) are built once
    result = {"device": torch.cuda.get_device_name(device) if real else "cpu", "micro_batch": args.micro_batch,
              "model": "qwen2.5-vl-7b-sized" if real else "7B layer counts, tiny widths"}
    for fp32_inputs in (True, False):
        found = census(model, batch, device, fp32_inputs)
        result[f"fp32_inputs_{str(fp32_inputs).lower()}"] = found
        print(f"\ntrain.lora.fp32_inputs={str(fp32_inputs).lower()}: {found['casts']} casts, "
              f"{found['elements'] / 1e6:.1f}M elements in one forward + backward of micro-batch {args.micro_batch}")
        for row in found["sites"][:args.top]:
            print(f"{row['casts']:7d} {row['elements'] / 1e6:10.2f}M  {row['site'][:140]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
