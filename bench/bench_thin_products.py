"""The LoRA adapters' 16-wide products, plain and split-K at several slice counts, per projection of the 7B model.

At rank 16, four of each adapter's products have an output one side of which is the rank: lora_A's forward
``x @ A.T`` and weight gradient ``gh.T @ x``, lora_B's input gradient ``g @ B`` and weight gradient ``g.T @ h``
(trainer/split_k.py). This times each of them at the recipe's token counts (the language model's q, k, v, o, gate,
up and down; the vision blocks' qkv, proj, gate, up and down) as one plain product and through
``trainer.split_k.split_k_matmul`` at each slice count, in bf16 (fp32 on the CPU), side by side in one process.
On CUDA each is timed as replays of a CUDA graph of ``--repeats`` calls (the GPU's time alone: each product is a
few microseconds, less than the host takes to launch it). It prints the plain time, the best split's and its
slice count, and the split at the count that ``train.lora.split_k`` chooses: what to set MIN_SLICE, MAX_SLICES
and TOKEN_SLICES from.

    python bench/bench_thin_products.py                    # H100/H200
    python bench/bench_thin_products.py --device cpu --scale 0.0625 --tokens 64 --iters 2 --slices 2,4   # smoke test
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_adapters import TOWERS, replayed  # noqa: E402
from bench.bench_projections import device_dtype_name, median_ms, products_parser  # noqa: E402
from trainer.split_k import TOKEN_SLICES, split_k_matmul, width_slices  # noqa: E402

RANK = 16


def thin_products(tokens: int, fan_in: int, fan_out: int, device, dtype) -> dict[str, tuple]:
    """Each thin product of one adapter: (a, b, whether k is the tokens, the slices the trainer chooses)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, fan_in, device=device, dtype=dtype, generator=g)
    grad_out = torch.randn(tokens, fan_out, device=device, dtype=dtype, generator=g)
    a_weight = torch.randn(RANK, fan_in, device=device, dtype=dtype, generator=g)
    b_weight = torch.randn(fan_out, RANK, device=device, dtype=dtype, generator=g)
    small = torch.randn(tokens, RANK, device=device, dtype=dtype, generator=g)  # h, or the gradient at h
    a_forward, _ = width_slices(*a_weight.shape)
    _, b_input_grad = width_slices(*b_weight.shape)
    return {
        "A forward": (x, a_weight.T, False, a_forward),
        "A weight grad": (small.T, x, True, TOKEN_SLICES),
        "B input grad": (grad_out, b_weight, False, b_input_grad),
        "B weight grad": (grad_out.T, small, True, TOKEN_SLICES),
    }


def timed(fn, device: torch.device, iters: int, repeats: int) -> float:
    """Median microseconds of one call of ``fn``: on CUDA of a graph of ``repeats`` calls, replayed."""
    if device.type != "cuda":
        return 1e3 * median_ms(fn, device, iters)
    return 1e3 * median_ms(replayed(lambda: [fn() for _ in range(repeats)]), device, iters) / repeats


def time_product(a, b, tokens_k: bool, chosen: int, slice_counts: list[int], device, iters: int, repeats: int
                 ) -> dict[str, float]:
    """Plain, at each slice count (checked against plain first) and at the trainer's count, in microseconds."""
    plain = a @ b
    out = {"plain_us": timed(lambda: a @ b, device, iters, repeats), "chosen_slices": chosen}
    for slices in sorted({*slice_counts, chosen} - {1}):
        split = split_k_matmul(a, b, slices, tokens=tokens_k)
        error = float((split.float() - plain.float()).norm() / plain.float().norm())
        if error > 2e-2:
            raise AssertionError(f"split-K at {slices} slices is {error:.1e} from the plain product")
        out[f"split_{slices}_us"] = timed(lambda s=slices: split_k_matmul(a, b, s, tokens=tokens_k), device, iters,
                                          repeats)
    splits = {int(k.split("_")[1]): v for k, v in out.items() if k.startswith("split_")}
    out["best_slices"] = min(splits, key=splits.get) if splits else 1
    out["best_us"] = splits.get(out["best_slices"], out["plain_us"])
    out["chosen_us"] = splits.get(chosen, out["plain_us"])
    return out


def main(argv=None) -> dict:
    parser = products_parser(__doc__.split("\n")[0], iters=7)
    parser.add_argument("--towers", default="language,vision")
    parser.add_argument("--tokens", help="tokens per micro-batch for every tower (default: each tower's own)")
    parser.add_argument("--slices", default="2,4,8,16,32", help="slice counts to time beside the trainer's")
    parser.add_argument("--repeats", type=int, default=50, help="calls per CUDA graph")
    args = parser.parse_args(argv)
    device, dtype, name = device_dtype_name(args.device)
    slice_counts = [int(s) for s in args.slices.split(",")]
    print(f"device {device} ({name}), {dtype}, rank {RANK}, median of {args.iters}"
          f"{f' replays of {args.repeats} calls' if device.type == 'cuda' else ''}, microseconds")
    print("| tower | tokens | projection | product | plain | best split (slices) | trainer's split (slices) | "
          "plain / trainer's |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, dict] = {}
    for tower in args.towers.split(","):
        shapes, default_tokens = TOWERS[tower]
        for tokens in (int(t) for t in (args.tokens or default_tokens).split(",")):
            for proj, (fan_in, fan_out, _) in shapes.items():
                fan_in, fan_out = max(RANK, int(fan_in * args.scale)), max(RANK, int(fan_out * args.scale))
                for product, (a, b, tokens_k, chosen) in thin_products(tokens, fan_in, fan_out, device,
                                                                       dtype).items():
                    r = time_product(a, b, tokens_k, chosen, slice_counts, device, args.iters, args.repeats)
                    results[f"{tower}_{tokens}_{proj}_{product.replace(' ', '_')}"] = r
                    print(f"| {tower} | {tokens} | {proj} | {product} | {r['plain_us']:.1f} | {r['best_us']:.1f} "
                          f"({r['best_slices']}) | {r['chosen_us']:.1f} ({r['chosen_slices']}) | "
                          f"{r['plain_us'] / r['chosen_us']:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
