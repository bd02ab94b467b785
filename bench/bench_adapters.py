"""What a LoRA adapter costs beside the frozen product it adapts, per projection of the 7B model, eager and compiled.

A CoVT step at micro-batch 4 spends 63 ms of its 457 ms of kernels in the adapters' rank-16 products and more in
their dropout and adds (bench_train_step.py --profile, BENCHMARKS.md): memory-bound work around the model's own
products. This isolates it. For each adapted projection of Qwen2.5-VL-7B (the language model's q, k, v, o, gate,
up and down; the vision blocks' qkv, proj, gate, up and down) at the token counts of the recipe's micro-batches,
it times one forward and backward (the input's gradient and the adapter's) of:

  base:   the frozen bf16 Linear alone (what the model's own product costs: the floor);
  <mode>: peft's lora.Linear over it, as the 7B configs attach it (r 16, alpha 32, dropout 0.01, fp32 adapter
          weights, the bf16 activations uncast: trainer.lora.attach_lora's settings), run eagerly (``eager``) or
          through torch.compile in that mode (``default``, ``max-autotune-no-cudagraphs``: inductor times its
          Triton templates against cuBLAS and can fuse the dropout into a product's loads); a mode ending in
          ``_split_k`` with the adapter's thin products split (``train.lora.split_k``, trainer/split_k.py).

bf16 autocast on CUDA (fp32 on the CPU), CUDA events, medians; it prints each projection's milliseconds and the
adapter's cost over base, and their sums over one decoder layer and one vision block.

    python bench/bench_adapters.py --modes eager,default,max-autotune-no-cudagraphs   # H100/H200
    python bench/bench_adapters.py --modes eager,default --graphed  # the GPU alone
    python bench/bench_adapters.py --modes default,default_split_k --graphed
    python bench/bench_adapters.py --device cpu --scale 0.0625 --tokens 64 --modes eager --iters 2   # smoke test
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_projections import device_dtype_name, median_ms, products_parser  # noqa: E402
from covt.compute import autocast  # noqa: E402
from trainer.lora import adapter_layers, cast_adapter_inputs, keep_trainable_in_fp32, use_split_k  # noqa: E402

# (in, out, bias) of each adapted projection: Qwen2.5-VL-7B's language model and vision blocks
LANGUAGE = {"q": (3584, 3584, True), "k": (3584, 512, True), "v": (3584, 512, True), "o": (3584, 3584, False),
            "gate": (3584, 18944, False), "up": (3584, 18944, False), "down": (18944, 3584, False)}
VISION = {"qkv": (1280, 3840, True), "proj": (1280, 1280, True), "gate": (1280, 3420, True),
          "up": (1280, 3420, True), "down": (3420, 1280, True)}
# tokens per micro-batch of the bench's samples (~607 text tokens, 1024 patches per 448x448 image)
TOWERS = {"language": (LANGUAGE, "608,2432"), "vision": (VISION, "1024,4096")}
EAGER_MODES = (None, "eager")  # None: the frozen projection alone
SPLIT_K = "_split_k"


class Projection(torch.nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(fan_in, fan_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(shape: tuple[int, int, bool], mode: str | None, device: torch.device, dtype: torch.dtype
          ) -> torch.nn.Module:
    """The frozen projection in the model's dtype, with the recipe's adapter (trainable, fp32) unless ``mode`` is
    None."""
    module = Projection(*shape).to(device, dtype).requires_grad_(False)
    if mode is None:
        return module
    model = get_peft_model(module, PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.01, target_modules=["proj"]))
    with torch.no_grad():  # peft starts B at zero; a trained adapter's B is not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    keep_trainable_in_fp32(model)
    cast_adapter_inputs(adapter_layers(model), False)
    use_split_k(adapter_layers(model), mode.endswith(SPLIT_K))
    return model.train()


def replayed(step, warmup: int = 3):
    """``step`` recorded as one CUDA graph after ``warmup`` calls on a side stream; returns its replay. The replays
    take the GPU's time alone: one projection's work is a fraction of a millisecond, less than the host takes to
    launch its kernels one by one, so events around direct calls time the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_projection(shape, tokens: int, mode: str | None, device, dtype, iters: int, graphed: bool = False
                    ) -> float:
    """Median ms of one forward and backward; ``mode`` None: the frozen projection alone; ``graphed``: of its
    replays as a CUDA graph (:func:`replayed`)."""
    module = build(shape, mode, device, dtype)
    compile_mode = mode.removesuffix(SPLIT_K) if mode else mode
    compiled = compile_mode not in EAGER_MODES
    if compiled:
        torch.compiler.reset()  # every projection runs peft's one forward: its variants would reach dynamo's limit
    run = torch.compile(module, mode=None if compile_mode == "default" else compile_mode) if compiled else module
    x = torch.randn(tokens, shape[0], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, shape[1], device=device, dtype=dtype)

    def step() -> None:
        with autocast(device, dtype == torch.bfloat16):
            out = run(x)
        out.backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    if graphed:
        return median_ms(replayed(step), device, iters)
    return median_ms(step, device, iters, warmup=2)  # compiles, autotunes, picks cuBLAS kernels


def main(argv=None) -> dict:
    parser = products_parser(__doc__.split("\n")[0], iters=10)
    parser.add_argument("--modes", default="eager,default", help="eager, default, max-autotune-no-cudagraphs")
    parser.add_argument("--towers", default="language,vision")
    parser.add_argument("--tokens", help="tokens per micro-batch for every tower (default: each tower's own)")
    parser.add_argument("--graphed", action="store_true",
                        help="time each forward and backward replayed as a CUDA graph: the GPU's time without the "
                             "host's (CUDA only)")
    args = parser.parse_args(argv)
    device, dtype, name = device_dtype_name(args.device)
    if args.graphed and device.type != "cuda":
        parser.error("--graphed records CUDA graphs: it needs --device cuda")
    modes = args.modes.split(",")
    time = functools.partial(time_projection, device=device, dtype=dtype, iters=args.iters, graphed=args.graphed)
    print(f"device {device} ({name}), {dtype}, LoRA r16 dropout 0.01, one forward and backward"
          f"{' replayed as a CUDA graph' if args.graphed else ''}, median of {args.iters}")
    print("| tower | tokens | projection | base ms | " + " | ".join(f"{m} ms (over base)" for m in modes) + " |")
    print("|---|---|---|---|" + "---|" * len(modes))
    results: dict[str, dict] = {}
    for tower in args.towers.split(","):
        shapes, default_tokens = TOWERS[tower]
        for tokens in (int(t) for t in (args.tokens or default_tokens).split(",")):
            rows = {}
            for proj, (fan_in, fan_out, bias) in shapes.items():
                shape = (max(16, int(fan_in * args.scale)), max(16, int(fan_out * args.scale)), bias)
                rows[proj] = {"base": time(shape, tokens, None), **{m: time(shape, tokens, m) for m in modes}}
            rows["all"] = {k: sum(r[k] for r in rows.values()) for k in ["base", *modes]}
            for proj, r in rows.items():
                cells = " | ".join(f"{r[m]:.3f} ({r[m] - r['base']:+.3f})" for m in modes)
                print(f"| {tower} | {tokens} | {proj} | {r['base']:.3f} | {cells} |")
            results[f"{tower}_{tokens}"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
