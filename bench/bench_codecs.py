"""Which codec for which target array: bytes per sample against the error the trainer's heads see.

For each float target array and each candidate codec, the targets are encoded and
decoded, and the anchor's head (``trainer.heads.build_heads``, its public
``head(thoughts, targets, views)``) is run on the exact and on the decoded targets
with the same thoughts. Reported per array and codec, the worst over samples and
head initialisations:

  loss  |loss(decoded) - loss(exact)| / |loss(exact)|
  grad  ||d loss/d thoughts (decoded) - (exact)|| / ||(exact)||

with the array's own relative L2 error beside them. Only one array of an anchor is
coded at a time (the others stay exact); then the recommended set (per array, the
smallest codec with loss and grad within --bound) is applied all together.

Targets come from the precompute anchors themselves on the bundled photos:
random-weight models at the real recipe's shapes (Depth Anything V2 ViT-L 4 x 1369 x 1024,
DINOv2 ViT-L/14 1025 x 1024, SAM ViT-B 256 x 64 x 64, the same embedding shape as ViT-H)
unless --checkpoints-from names a config with real checkpoints; PIDINet always has its
real weights. Features of random-weight ViTs may compress differently from trained ones
(low rank especially): precompute therefore re-measures on the user's first shard.

    python bench/bench_codecs.py                          # smoke test: tiny anchors, 2 photos, CPU
    python bench/bench_codecs.py --real --images 7        # real shapes, random weights (GPU or patient CPU)
    python bench/bench_codecs.py --real --checkpoints-from configs/covt_7b_sam_depth_dino.yaml --device cuda

--write-defaults writes the recommendation to shards/codec_defaults.json (what
``cache.codec: auto`` uses), each entry with its measurements and the relative L2
error at which its head error would reach the bound (``max_rel_l2``, the measured
error scaled by bound / worst head error), which precompute holds the user's first
shard to.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covt.anchors import get_anchor  # noqa: E402
from covt.config import CheckpointConfig, DataConfig, PrecomputeConfig, load_config  # noqa: E402
from precompute.anchors import load_anchor  # noqa: E402
from precompute.records import load_records  # noqa: E402
from precompute.run import decode_views  # noqa: E402
from shards.codecs import CODECS, Codec, CodecError  # noqa: E402
from trainer.heads import CacheDims, build_heads  # noqa: E402

ANCHORS = ["sam", "depth", "dino", "pidinet"]
FLOAT_CANDIDATES = ["bf16", "fp8", "fp8row"] + [n for n in CODECS if n.startswith("lowrank")]
REAL_VARIANTS = {"sam": "vit_b", "depth": "vitl", "dino": "vitl"}
TINY_VARIANTS = {"sam": "vit_tiny", "depth": "vit_tiny", "dino": "vit_tiny"}
PIDINET = CheckpointConfig(path=str(REPO / "data/checkpoints/table5_baseline.pth"), variant="baseline")


def precompute_config(args, workdir: Path) -> PrecomputeConfig:
    pre = PrecomputeConfig(device=args.device, batch_size=2, num_workers=0)
    pre.sam.points_per_side, pre.sam.pred_iou_thresh, pre.sam.stability_score_thresh = 8, 0.1, 0.0
    if args.checkpoints_from:
        real = load_config(args.checkpoints_from).precompute
        pre.checkpoints = dict(real.checkpoints)
        pre.sam = real.sam
    variants = REAL_VARIANTS if args.real else TINY_VARIANTS
    for i, (name, variant) in enumerate(variants.items()):
        pre.checkpoints.setdefault(name, CheckpointConfig(str(workdir / f"{name}_{variant}.pth"), variant, i))
    pre.checkpoints.setdefault("pidinet", PIDINET)
    return pre


def anchor_targets(anchors: list[str], pre: PrecomputeConfig, images: int, decoders: Path):
    """Targets (numpy, batch first), dims and the uint8 views of ``images`` bundled photos, per anchor."""
    data = DataConfig(path=str(REPO / "data/sample/conversations.json"),
                      image_folder=str(REPO / "data/sample/images"), limit=images)
    records, _ = load_records(data)
    device = torch.device(pre.device if pre.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    for name in anchors:
        model = load_anchor(name, pre, device)
        model.export_decoders(decoders)
        key = ("square", model.input_size)  # precompute.views.view_key(..., 'square'): the default views
        views = np.stack([decode_views(r, [key])[key] for r in records])
        t0 = time.perf_counter()
        with torch.no_grad():
            targets = model.compute(torch.from_numpy(views).to(device))
        print(f"  {name}: {len(records)} images in {time.perf_counter() - t0:.1f}s on {device}", flush=True)
        out[name] = {"dims": model.dims(), "targets": {k: np.asarray(v) for k, v in targets.items()}}
        del model
    return out, records


def as_torch(arrays: dict[str, np.ndarray], anchor: str) -> dict[str, torch.Tensor]:
    kinds = {a.name: a.kind for a in get_anchor(anchor).arrays}
    dtype = {"float": torch.float32, "mask": torch.bool, "count": torch.int64}
    return {k: torch.from_numpy(np.array(v)).to(dtype[kinds[k]]) for k, v in arrays.items()}


def loss_and_grad(head, thoughts: torch.Tensor, targets: dict, views) -> tuple[float, torch.Tensor]:
    t = thoughts.clone().requires_grad_(True)
    loss = head(t, targets, views)
    (grad,) = torch.autograd.grad(loss, t)
    return float(loss.detach()), grad


def head_views(head, records, size_cache: dict) -> torch.Tensor | None:
    size = getattr(head, "view_size", None)
    if not size:
        return None
    if size not in size_cache:
        v = np.stack([decode_views(r, [("square", size)])[("square", size)] for r in records])
        size_cache[size] = torch.from_numpy(v).permute(0, 3, 1, 2).contiguous()
    return size_cache[size]


def stored_bytes(codec: Codec, shape) -> int:
    return sum(int(np.prod(p.shape, dtype=np.int64)) * p.dtype.itemsize for p in codec.stored(shape))


def coded(codec: Codec, x: np.ndarray) -> tuple[np.ndarray, float]:
    parts, err = codec.encode_measured(x)
    rel = float(np.sqrt(err["sum_sq_err"] / err["sum_sq_ref"])) if err and err["sum_sq_ref"] > 0 else 0.0
    return codec.decode(parts, x.shape[1:]), rel


def errors(heads, anchor: str, exact: dict, decoded: dict, thoughts_by_seed, views) -> dict:
    """Worst relative loss and gradient change; NaN (never within a bound) where the exact loss and gradient
    are zero for every seed, e.g. SAM with a random decoder whose masks all fail the thresholds: no signal."""
    worst_loss = worst_grad = 0.0
    signal = False
    for seed, thoughts in thoughts_by_seed:
        head = heads[seed][anchor]
        l0, g0 = loss_and_grad(head, thoughts, as_torch(exact, anchor), views)
        l1, g1 = loss_and_grad(head, thoughts, as_torch(decoded, anchor), views)
        signal = signal or l0 != 0 or bool(g0.abs().sum() > 0)
        worst_loss = max(worst_loss, abs(l1 - l0) / max(abs(l0), 1e-12))
        worst_grad = max(worst_grad, float((g1 - g0).norm() / g0.norm().clamp_min(1e-12)))
    if not signal:
        return {"loss_rel": float("nan"), "grad_rel": float("nan")}
    return {"loss_rel": worst_loss, "grad_rel": worst_grad}


def per_sample_errors(heads, anchor, exact: dict, decoded: dict, thoughts, views) -> dict:
    """The worst of :func:`errors` over the samples, one sample at a time."""
    n = len(next(iter(exact.values())))
    worst = {"loss_rel": 0.0, "grad_rel": 0.0}
    for i in range(n):
        one = [(seed, t[i:i + 1]) for seed, t in thoughts]
        e = errors(heads, anchor, {k: v[i:i + 1] for k, v in exact.items()},
                   {k: v[i:i + 1] for k, v in decoded.items()}, one, None if views is None else views[i:i + 1])
        worst = {k: max(worst[k], e[k]) for k in worst}
    return worst


def measure(anchor: str, exact: dict, heads, thoughts, views, bound: float) -> tuple[list[dict], dict]:
    """Rows of (array, codec, bytes, errors) and the recommended codec per float array."""
    rows, choice = [], {}
    for spec in get_anchor(anchor).arrays:
        if spec.kind != "float":
            continue
        x = exact[spec.name]
        shape = x.shape[1:]
        base = stored_bytes(CODECS["bf16"], shape)
        fits = []
        for name in FLOAT_CANDIDATES:
            codec = CODECS[name]
            try:
                size = stored_bytes(codec, shape)
            except CodecError:
                continue  # e.g. low rank of a vector
            if name != "bf16" and size >= base:
                continue  # no smaller than bf16: not a candidate
            decoded, rel_l2 = coded(codec, x)
            e = per_sample_errors(heads, anchor, exact, {**exact, spec.name: decoded}, thoughts, views)
            rows.append({"array": f"{anchor}/{spec.name}", "codec": name, "bytes": size, "rel_l2": rel_l2, **e})
            print(f"  {anchor}/{spec.name:10s} {name:15s} {size / 2**20:8.3f} MiB  rel L2 {rel_l2:.2e}  "
                  f"loss {e['loss_rel']:.2e}  grad {e['grad_rel']:.2e}", flush=True)
            if e["loss_rel"] <= bound and e["grad_rel"] <= bound:
                fits.append((size, name))
        choice[spec.name] = min(fits)[1] if fits else "fp32"
    return rows, choice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="the real recipe's shapes (ViT-L depth/dino, SAM 64x64)")
    p.add_argument("--checkpoints-from", help="a config whose precompute.checkpoints hold real weights")
    p.add_argument("--anchors", default=",".join(ANCHORS))
    p.add_argument("--images", type=int, default=2, help="bundled photos to measure on (up to 7)")
    p.add_argument("--seeds", type=int, default=2, help="head initialisations and thoughts per sample")
    p.add_argument("--hidden", type=int, default=None, help="thought width (default: 3584 real, 64 tiny)")
    p.add_argument("--bound", type=float, default=0.01, help="relative loss/gradient error allowed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows and the recommendation here")
    p.add_argument("--write-defaults", action="store_true", help="write shards/codec_defaults.json")
    args = p.parse_args()
    anchors = args.anchors.split(",")
    hidden = args.hidden or (3584 if args.real else 64)
    torch.set_grad_enabled(True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "decoders").mkdir()
        print(f"targets from the precompute anchors ({'real' if args.real else 'tiny'} shapes):", flush=True)
        data, records = anchor_targets(anchors, precompute_config(args, work), args.images, work / "decoders")
        dims = CacheDims({a: data[a]["dims"] for a in anchors}, work / "decoders")
        heads, thoughts, rows, choice, view_cache = {}, {}, [], {}, {}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            heads[seed] = build_heads(anchors, hidden, dims)
        print(f"head errors (worst over {len(records)} samples x {args.seeds} seeds), bound {args.bound}:")
        for anchor in anchors:
            g = torch.Generator().manual_seed(1234)
            tokens = heads[0][anchor].num_tokens
            thoughts = [(s, torch.randn(len(records), tokens, hidden, generator=g)) for s in range(args.seeds)]
            views = head_views(heads[0][anchor], records, view_cache)
            r, c = measure(anchor, data[anchor]["targets"], heads, thoughts, views, args.bound)
            rows += r
            choice[anchor] = c
    summary = summarise(choice, data, anchors)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, **summary}, indent=1))
    if args.write_defaults:
        write_defaults(rows, summary["recommended"], args)


def write_defaults(rows: list[dict], recommended: dict[str, str], args) -> None:
    """shards/codec_defaults.json: per array the recommended codec unless it is bf16 (the default anyway);
    fp32 where not even bf16 kept the head errors within the bound."""
    weights = "real checkpoints" if args.checkpoints_from else "random weights (PIDINet: its real weights)"
    arrays = {}
    for key, codec in sorted(recommended.items()):
        if codec == "bf16":
            continue
        bf16 = next(r for r in rows if r["array"] == key and r["codec"] == "bf16")
        if codec == "fp32":
            arrays[key] = {"codec": codec, "bf16_loss_rel": bf16["loss_rel"], "bf16_grad_rel": bf16["grad_rel"]}
            continue
        row = next(r for r in rows if r["array"] == key and r["codec"] == codec)
        worst = max(row["loss_rel"], row["grad_rel"], 1e-12)
        arrays[key] = {"codec": codec, "bytes_per_sample": row["bytes"], "rel_l2": row["rel_l2"],
                       "loss_rel": row["loss_rel"], "grad_rel": row["grad_rel"],
                       "max_rel_l2": row["rel_l2"] * args.bound / worst}
    out = {"source": f"bench/bench_codecs.py --real={args.real} --images {args.images} --seeds {args.seeds}; "
                     f"{weights}", "bound": args.bound, "arrays": arrays}
    path = REPO / "shards" / "codec_defaults.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def summarise(choice: dict, data: dict, anchors: list[str]) -> dict:
    """Bytes per sample of every array with bf16 floats, and with the recommended codecs."""
    before = after = 0
    for anchor in anchors:
        for spec in get_anchor(anchor).arrays:
            shape = data[anchor]["targets"][spec.name].shape[1:]
            default = {"float": "bf16", "mask": "packbits", "count": "int32"}[spec.kind]
            before += stored_bytes(CODECS[default], shape)
            after += stored_bytes(CODECS[choice[anchor].get(spec.name, default)], shape)
    return {"recommended": {f"{a}/{k}": v for a, c in choice.items() for k, v in c.items()},
            "bytes_per_sample_bf16": before, "bytes_per_sample_recommended": after}


if __name__ == "__main__":
    main()
