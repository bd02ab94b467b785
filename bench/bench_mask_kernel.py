"""SAM's fused mask kernel (precompute/anchors/sam_masks.py) per launch configuration, side by side.

    python bench/bench_mask_kernel.py --isolate                # CUDA: 1,024 prompts (one image at 32 points per side)
    python bench/bench_mask_kernel.py --prompts 4096 --dtype fp32
    python bench/bench_mask_kernel.py --no-autotune --configs 64x4x4,g32x8x4
    python bench/bench_mask_kernel.py --quick                  # CPU: Triton's interpreter, one prompt

Random image tokens and mask tokens at the real decoder's widths (a mask decoder with random weights, the same in
every SAM variant: 64 x 64 tokens of 256 channels, upscaled to 64 then 32 channels, 3 masks per prompt). Each
configuration is ``BLOCKxWARPSxSUBPIXELS`` (the per-sub-pixel kernel: tokens per program, warps, the first
upscaling's sub-pixels per program, 4 or 1) or ``gBLOCKxWARPSxGROUP`` (the grouped kernel: the first upscaling's
sub-pixels per product, 1, 2 or 4); a suffix ``sN`` sets ``num_stages`` (Triton's default 3). For each, the
CUDA-synchronised time of one ``mask_statistics`` call after a warm-up, the upscalings' TFLOP/s, the ratio to the
first row (the per-sub-pixel kernel's autotuned choice, then the grouped kernel's, timed the same way), and whether
its masks and counts equal the first row's (a fingerprint of them). ``--no-autotune`` leaves the autotuned rows out.
With bf16 tokens a GPU refuses the per-sub-pixel kernel (``sam_masks.kernel_for``: it stopped on illegal memory
accesses on H100s), so the bf16 defaults are the grouped kernel's rows; a refused configuration is an error row.
A launch that fails on the GPU (an illegal memory access) leaves the process's CUDA context unusable, and an
autotuning run compiles and runs every configuration of its list: ``--isolate`` runs each row in a process of its
own, so a failure becomes an error row and the others are still timed. On the CPU (``--quick``) the interpreter runs
each configuration once on one prompt: a smoke run, its times mean nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if "--quick" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precompute import seconds_per_batch  # noqa: E402

from covt.compute import use_tf32  # noqa: E402
from precompute.anchors.sam import BUILDERS  # noqa: E402
from precompute.anchors.sam_masks import (  # noqa: E402
    MASK_KERNELS,
    kernel_for,
    launch_kernel,
    mask_statistics,
    parse_launch,
)

# per tokens' dtype: on a GPU the per-sub-pixel kernel refuses bf16 tokens (sam_masks.kernel_for)
DEFAULT_CONFIGS = {"bf16": "g32x8x4,g64x8x4,g64x8x2,g64x8x1,g128x8x1,g32x8x4s1",
                   "fp32": "128x8x1,64x8x1,32x4x1,64x4x1,g64x8x1"}
QUICK_CONFIGS = "4096x4x4,4096x4x1,2048x4x4,g1024x4x4,g2048x4x1"
KERNEL_OF_ROW = {"autotuned": "subpixels", "autotuned grouped": "grouped"}


def upscaling_flops(prompts: int, tokens: int, c: int, c1: int, c2: int, columns: int) -> float:
    """Multiply-adds x 2 of the two upscalings and the masks' contraction (padded to ``columns``) per call."""
    return 2.0 * prompts * tokens * 4 * (c * c1 + 4 * c1 * c2 + 4 * c2 * columns)


def digest(stats) -> str:
    """A fingerprint of a call's masks and counts, compared between rows (and between processes with --isolate)."""
    h = hashlib.sha256()
    for t in (stats.masks, stats.area, stats.inner, stats.outer):
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def autotuned_rows(dtype: str, unrefused: bool = False) -> list[str]:
    """The autotuners' rows on a GPU: each kernel's that runs tokens of ``dtype`` (``unrefused``: every kernel's)."""
    tokens = torch.bfloat16 if dtype == "bf16" else torch.float32
    return [row for row, kernel in KERNEL_OF_ROW.items() if unrefused or gpu_runs(kernel, tokens)]


def gpu_runs(kernel: str, tokens: torch.dtype) -> bool:
    """Whether a GPU runs ``kernel`` for tokens of that dtype (``sam_masks.kernel_for`` refuses the others)."""
    try:
        kernel_for(kernel, tokens, on_gpu=True)
    except ValueError:
        return False
    return True


def measure(name: str, call, device: torch.device, iters: int) -> dict:
    """One row: the configuration (or autotuner) ``name`` compiled (tuned) and timed, and its masks' fingerprint."""
    kernel = KERNEL_OF_ROW.get(name)
    launch = None if kernel else parse_launch(name)
    kernel = kernel or launch_kernel(launch)
    try:
        stats = call(launch, kernel)
    except OutOfResources as e:  # more shared memory or registers than the GPU has
        return {"error": f"out of resources: {e}"}
    except ValueError as e:  # a kernel the GPU refuses for these tokens (sam_masks.kernel_for)
        return {"error": str(e)}
    t = seconds_per_batch(lambda: call(launch, kernel), device, 0, iters)
    config = str(MASK_KERNELS[kernel][1].best_config) if launch is None else name
    return {"s": t, "config": config, "digest": digest(stats)}


def isolated(name: str, args: argparse.Namespace) -> dict:
    """:func:`measure` in a process of its own: a launch that fails on the GPU (an illegal memory access leaves the
    process's CUDA context unusable) becomes an error row instead of ending the run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--configs", name, "--no-autotune", "--json", str(out),
               "--dtype", args.dtype] + ["--quick"] * args.quick
        cmd += [f"--{k}={v}" for k, v in (("prompts", args.prompts), ("iters", args.iters)) if v]
        cmd += ["--unrefused"] * args.unrefused
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"error": failure(proc.stderr, proc.returncode), "stderr_tail": proc.stderr.splitlines()[-40:]}
        return json.loads(out.read_text())["rows"][name]


def failure(stderr: str, returncode: int) -> str:
    """Why a row's process failed: the CUDA error's own line where there is one (the exception's last line is often
    only the hint that CUDA reports errors asynchronously), else the last exception raised."""
    lines = stderr.splitlines()
    cuda = [line for line in lines if "CUDA error" in line]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (cuda or raised or [f"exit status {returncode}"])[-1].strip()[:300]


def print_rows(rows: dict[str, dict], flops: float) -> None:
    good = [k for k, r in rows.items() if "error" not in r]
    if not good:
        print("no configuration ran")
    first = rows[good[0]] if good else None
    print(f"{'configuration':>17} | ms per call | TFLOP/s | vs {good[0] if good else '-'} | masks and counts equal")
    for key, row in rows.items():
        if "error" in row:
            print(f"{key:>17} | failed: {row['error']}")
            continue
        print(f"{key:>17} | {row['s'] * 1e3:11.2f} | {flops / row['s'] / 1e12:7.1f} | {first['s'] / row['s']:8.2f}x | "
              f"{row['digest'] == first['digest']}" + (f"  ({row['config']})" if key in KERNEL_OF_ROW else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run in Triton's interpreter (one prompt)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per call (default 1,024; quick: 1)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="the image tokens' dtype: the products' (fp32 in TF32)")
    ap.add_argument("--configs", default=None, help="BLOCKxWARPSxSUBPIXELS and gBLOCKxWARPSxGROUP, each [sSTAGES], "
                                                    f"list (default, bf16: {DEFAULT_CONFIGS['bf16']}; fp32: "
                                                    f"{DEFAULT_CONFIGS['fp32']}; quick: {QUICK_CONFIGS})")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per configuration (default 10; quick: 1)")
    ap.add_argument("--no-autotune", dest="autotune", action="store_false",
                    help="time the configurations given only, not the two autotuners first")
    ap.add_argument("--isolate", action="store_true",
                    help="each row in a process of its own: one that fails on the GPU becomes an error row")
    ap.add_argument("--unrefused", action="store_true",
                    help="run the configurations a GPU refuses for these tokens (sam_masks.kernel_for), to find their "
                         "fault, e.g. under compute-sanitizer")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for a CPU smoke run in Triton's interpreter", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.quick else "cuda")
    prompts = args.prompts or (1 if args.quick else 1024)
    iters = args.iters or (1 if args.quick else 10)
    configs = (args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS[args.dtype])).split(",")
    names = (autotuned_rows(args.dtype, args.unrefused) if device.type == "cuda" and args.autotune else []) + configs
    use_tf32(True)
    dtype = torch.bfloat16 if args.dtype == "bf16" and not args.quick else torch.float32  # interpreter: fp32 dots

    torch.manual_seed(0)
    with torch.device(device):
        sam = BUILDERS["vit_b"](None).eval()  # the smallest encoder: only the mask decoder is used
    h, w = sam.prompt_encoder.image_embedding_size
    keys = torch.randn(prompts, h * w, sam.prompt_encoder.embed_dim, device=device).to(dtype)
    tokens = torch.randn(prompts, 3, sam.prompt_encoder.embed_dim, device=device)
    conv1, _, _, conv2, _ = sam.mask_decoder.output_upscaling
    flops = upscaling_flops(prompts, h * w, keys.shape[-1], conv1.out_channels, conv2.out_channels, 16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"
    print(f"device: {name}, torch {torch.__version__}, {prompts} prompts, tokens {str(dtype).split('.')[-1]}"
          + (", each row in its own process" if args.isolate else ""))

    def call(launch: dict | None, kernel: str):
        return mask_statistics(sam, keys, tokens, 0.0, 1.0, launch=launch, kernel=kernel, refuse=not args.unrefused)

    rows: dict[str, dict] = {}
    with torch.no_grad():  # each row's first call compiles (an autotuner's also tunes) and gives its fingerprint
        for n in names:
            rows[n] = row = isolated(n, args) if args.isolate else measure(n, call, device, iters)
            print(f"  {n}: " + (f"failed: {row['error']}" if "error" in row else f"{row['s'] * 1e3:.2f} ms"),
                  flush=True)
    print_rows(rows, flops)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "prompts": prompts, "dtype": str(dtype).split(".")[-1],
                                         "tflop_per_call": flops / 1e12, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
