"""The decoder layer's projections at the recipe's micro-batch sizes: separate against concatenated weights.

Qwen2.5-VL-7B's attention projects each token with three matrices (q 3584x3584, k and v 512x3584: grouped-query)
and its MLP with two (gate and up, 18944x3584), each its own product in transformers. Where a micro-batch holds
few tokens (one sample: ~600; the 8-GPU layout's micro-batch of 1), the narrow k and v products fill few of the
GPU's multiprocessors. This times, per token count, the forward product ``x @ W.T`` and the input gradient
``dy @ W`` of each group as separate products against one product with the group's weights concatenated (what a
fused projection would run), in bf16 with CUDA events (medians), side by side in one process, and prints the
achieved TFLOP/s and the ratio. The frozen base weights only: the LoRA adapters' rank-16 products are apart.

    python bench/bench_projections.py                      # tokens of micro-batches 1, 2, 4 and 8
    python bench/bench_projections.py --device cpu --tokens 64 --scale 0.0625 --iters 2   # smoke test
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HIDDEN, KV, INTERMEDIATE = 3584, 512, 18944  # Qwen2.5-VL-7B's language model
GROUPS = {"qkv": (HIDDEN, KV, KV), "gate_up": (INTERMEDIATE, INTERMEDIATE)}


def median_ms(fn, device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls, after ``warmup`` (cuBLAS picks its kernels, torch.compile
    compiles and autotunes); CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def time_group(tokens: int, widths: tuple[int, ...], hidden: int, device, dtype, iters: int) -> dict[str, float]:
    """Forward and input-gradient products of one group, separate and concatenated (ms, TFLOP/s)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    weights = [torch.randn(w, hidden, device=device, dtype=dtype, generator=g) / hidden ** 0.5 for w in widths]
    grads = [torch.randn(tokens, w, device=device, dtype=dtype, generator=g) for w in widths]
    fused_w, fused_dy = torch.cat(weights), torch.cat(grads, dim=1)
    flops = 2 * tokens * hidden * sum(widths)
    parts = {
        "forward_separate": lambda: [x @ w.T for w in weights],
        "forward_concatenated": lambda: x @ fused_w.T,
        "input_grad_separate": lambda: sum(dy @ w for dy, w in zip(grads, weights)),
        "input_grad_concatenated": lambda: fused_dy @ fused_w,
    }
    out = {}
    for name, fn in parts.items():
        ms = median_ms(fn, device, iters)
        out[f"{name}_ms"] = ms
        out[f"{name}_tflops"] = flops / ms / 1e9
    for part in ("forward", "input_grad"):
        out[f"{part}_ratio"] = out[f"{part}_separate_ms"] / out[f"{part}_concatenated_ms"]
    return out


def products_parser(description: str, iters: int) -> argparse.ArgumentParser:
    """The options this bench and bench_adapters.py share: device, widths scaled down, calls timed, JSON out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every width by this factor (smoke test)")
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--json", type=Path)
    return parser


def device_dtype_name(device: str) -> tuple[torch.device, torch.dtype, str]:
    """The device, the dtype timed there (bf16 on CUDA, fp32 on the CPU) and the device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return device, torch.bfloat16, torch.cuda.get_device_name(device)
    return device, torch.float32, "cpu"


def main(argv=None) -> dict:
    parser = products_parser(__doc__.split("\n")[0], iters=20)
    parser.add_argument("--tokens", default="608,1216,2432,4864",
                        help="tokens per micro-batch (the bench's samples: ~607 each, micro-batches of 1, 2, 4, 8)")
    args = parser.parse_args(argv)
    device, dtype, name = device_dtype_name(args.device)
    hidden = int(HIDDEN * args.scale)
    print(f"device {device} ({name}), {dtype}, hidden {hidden}, {args.iters} timed calls each (median)")
    print("| tokens | group | forward separate | concatenated | ratio | input gradient separate | concatenated "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for group, widths in GROUPS.items():
            r = time_group(tokens, tuple(int(w * args.scale) for w in widths), hidden, device, dtype, args.iters)
            results[f"{tokens}_{group}"] = r
            print(f"| {tokens} | {group} | {r['forward_separate_ms']:.3f} ms ({r['forward_separate_tflops']:.0f} "
                  f"TFLOP/s) | {r['forward_concatenated_ms']:.3f} ms ({r['forward_concatenated_tflops']:.0f}) | "
                  f"{r['forward_ratio']:.2f}x | {r['input_grad_separate_ms']:.3f} ms "
                  f"({r['input_grad_separate_tflops']:.0f}) | {r['input_grad_concatenated_ms']:.3f} ms "
                  f"({r['input_grad_concatenated_tflops']:.0f}) | {r['input_grad_ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
