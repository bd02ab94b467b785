"""Precompute throughput: images/s per anchor and for sam+depth+dino together, at real sizes.

    python bench/bench_precompute.py                   # CUDA: SAM vit_h, Depth Anything V2 ViT-L, DINOv2 ViT-L
    python bench/bench_precompute.py --batch-sizes 8,16 --iters 5
    python bench/bench_precompute.py --quick           # CPU smoke run with the tiny variants
    python bench/bench_precompute.py --batch-sizes 16 --dtype fp32 --no-sam-details --decoder-variants --compile-decoder

Random weights of the real architectures (speed does not depend on the values),
fed the bundled photos resized to each anchor's square view and repeated to the
batch size. SAM's automatic mask generation runs with its thresholds at 0 so
every grid candidate survives to NMS: the worst case for the selection step
(with trained weights most candidates are dropped before NMS). Times are
CUDA-synchronised wall times of ``anchor.compute`` (views already on the device,
targets back on the CPU as numpy), after warm-up. Also measured: SAM's image
encoder with segment_anything's attention vs the SDPA versions of sam_fast.py on
the same batch (speed ratio and how far the embedding moves), SAM's mask
decoder per-image vs batched across images and bf16 vs fp32 (speed, and how far
the bf16 masks move), and the CPU cost of ``CacheWriter.write_targets`` per image
(codec + zstd + checksums), which the driver overlaps with the next shard's compute.
``--decoder-variants`` times the mask generation alone with each
``precompute.sam.decoder_attention`` (and, with ``--compile-decoder``, compiled), side by
side on the same embeddings, with how far each one's candidates move from the first's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from covt.compute import tf32_matmuls, use_tf32  # noqa: E402
from covt.config import SamPrecomputeConfig  # noqa: E402
from covt.images import square_view  # noqa: E402
from precompute.anchors.base import AnchorModel, to_host  # noqa: E402
from precompute.anchors.depth import DepthAnchor, DepthAnythingV2  # noqa: E402
from precompute.anchors.dino import DinoAnchor, HubDino  # noqa: E402
from precompute.anchors.sam import BUILDERS, SamAnchor, fused_keys_dtype  # noqa: E402
from precompute.anchors.sam_fast import ATTENTION_MODES, DECODER_ATTENTIONS  # noqa: E402
from precompute.anchors.sam_masks import MASK_KERNELS, kernel_for, launch_kernel, parse_launch  # noqa: E402
from precompute.anchors.vit import DinoVisionTransformer, get_variant, randomize_  # noqa: E402
from precompute.run import AnchorsBesideSam, AnchorTiming  # noqa: E402
from shards.samples import Record  # noqa: E402

REFERENCE_SECONDS_PER_IMAGE = 1.1  # the reference recomputes the anchors inside each training step (H100)
TARGET_IMAGES_PER_S = 10.0  # issue 3, at its 16 points per side
TARGET_AT_32_POINTS = 20.0  # issue 19: sam+depth+dino at the reference's 32 points per side
PHOTOS = sorted((REPO / "data/sample/images").glob("*.jpg"))


def build_anchors(device: torch.device, quick: bool, dtype: str,
                  points_per_side: int | None = None) -> dict[str, AnchorModel]:
    sam_variant, vit_variant = ("vit_tiny", "vit_tiny") if quick else ("vit_h", "vitl")
    amg = SamPrecomputeConfig(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    if points_per_side or quick:
        amg.points_per_side = points_per_side or 8
    with torch.device(device):
        sam = BUILDERS[sam_variant](None)
        depth = DepthAnythingV2(get_variant(vit_variant))
        dino = HubDino(randomize_(DinoVisionTransformer(get_variant(vit_variant)), 0))
    v = get_variant(vit_variant)
    return {
        "sam": SamAnchor(sam, amg, variant=sam_variant, checkpoint="(random)", checkpoint_sha256="",
                         bf16=dtype == "bf16").to(device),
        "depth": DepthAnchor(depth.to(device), "(random)", dtype),
        "dino": DinoAnchor(dino.to(device), v.dino_input_size, v.name, "(random)", dtype),
    }


def photo_batch(size: int, batch: int, device: torch.device) -> torch.Tensor:
    from PIL import Image

    views = [square_view(Image.open(p), size) for p in PHOTOS]
    return torch.from_numpy(np.stack([views[i % len(views)] for i in range(batch)])).to(device)


def target_images_per_s(points_per_side: int) -> float:
    """sam+depth+dino's target on one GPU: issue 19's at the reference's 32 points per side, issue 3's below."""
    return TARGET_AT_32_POINTS if points_per_side >= 32 else TARGET_IMAGES_PER_S


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_batch(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


@contextmanager
def sam_settings(sam, **settings):
    """``sam``'s attributes (a SamAnchor's or its config's) set to ``settings`` inside the block."""
    old = {k: getattr(sam, k) for k in settings}
    for k, v in settings.items():
        setattr(sam, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(sam, k, v)


def seconds_beside_sam(anchors: dict[str, AnchorModel], views: dict[str, torch.Tensor], device: torch.device,
                       warmup: int, iters: int) -> float:
    """Seconds per batch of every anchor's targets as ``precompute.overlap_anchors`` computes them
    (``precompute.run.AnchorsBesideSam``): SAM in this thread, the others in a second thread on a CUDA stream of their
    own; the thread is shut down after."""
    timing = AnchorTiming()
    with closing(AnchorsBesideSam(device)) as beside:
        return seconds_per_batch(lambda: beside.compute(anchors, views, timing), device, warmup, iters)


def compiled_anchors(anchors: dict[str, AnchorModel], names: str, batch: int, device: torch.device, warmup: int,
                     iters: int) -> dict[str, dict[str, float]]:
    """``precompute.compile_anchors`` for each of the comma-separated ``names``: the anchor timed eager, then
    compiled (``AnchorModel.compile_network``), side by side on the same ``batch`` views, with how far each target
    moves (relative L2). The anchors stay compiled for the rows."""
    out = {}
    for name in filter(None, names.split(",")):
        anchor = anchors[name]
        views = photo_batch(anchor.input_size, batch, device)
        run = lambda a=anchor, v=views: a.compute(v)  # noqa: E731
        eager_s, eager = seconds_per_batch(run, device, warmup, iters), run()
        anchor.compile_network()
        compiled_s, compiled = seconds_per_batch(run, device, warmup, iters), run()
        norms = {k: float(np.linalg.norm(v)) for k, v in eager.items()}
        moved = {k: float(np.linalg.norm(compiled[k] - v) / max(norms[k], 1e-30)) for k, v in eager.items()}
        out[name] = {"eager_images_per_s": batch / eager_s, "compiled_images_per_s": batch / compiled_s,
                     **{f"{k}_rel_l2": m for k, m in moved.items()}, **{f"{k}_eager_norm": n for k, n in norms.items()}}
        # the eager target's norm beside each drift: a relative drift of a (near) zero target says little
        print(f"{name} compiled: {batch / compiled_s:.2f} images/s against eager {batch / eager_s:.2f} "
              f"({eager_s / compiled_s:.2f}x), batch {batch}; targets moved (relative L2): "
              + ", ".join(f"{k} {m:.2e} (eager norm {norms[k]:.3g})" for k, m in moved.items()))
    return out


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def encoder_variants(sam: SamAnchor, views: torch.Tensor, device, warmup, iters, compile_encoder: bool) -> dict:
    """SAM's image encoder with each attention mode (eager), side by side on the same batch, and how far each
    embedding moves from segment_anything's attention; the default mode with ``precompute.sam.unpadded_windows``; with
    ``compile_encoder`` also the default mode compiled, with and without the unpadded windows."""
    out = {}
    default = sam.encoder_attention
    with sam_settings(sam, encoder_attention="library", compile_encoder=False):
        emb_library = sam.embed(views)

    def timed(name: str, **settings) -> None:
        with sam_settings(sam, **settings):
            if settings["compile_encoder"]:
                sam.embed(views)  # compiles
            out[f"{name}_s"] = seconds_per_batch(lambda: sam.embed(views), device, warmup, iters)
            out[f"{name}_vs_library_rel_l2"] = float((sam.embed(views) - emb_library).norm() / emb_library.norm())

    for mode in ATTENTION_MODES:
        timed(f"encoder_{mode}", encoder_attention=mode, compile_encoder=False)
    timed(f"encoder_{default}_unpadded", unpadded_windows=True, compile_encoder=False)  # sam.unpadded_windows
    for unpadded in (False, True) if compile_encoder else ():
        timed(f"encoder_{default}{'_unpadded' if unpadded else ''}_compiled", compile_encoder=True,
              unpadded_windows=unpadded)
    return out


def sam_details(sam: SamAnchor, views: torch.Tensor, device, warmup, iters, compile_encoder: bool = False,
                compile_decoder: bool = False) -> dict:
    """Encoder per attention mode (library vs SDPA) and mask generation time; decoder batched
    (sam_fast.decode_outputs) vs per image (segment_anything's MaskDecoder.forward); bf16 vs fp32 decoder;
    with ``compile_decoder``, the batched decoding eager vs compiled (precompute.sam.compile_decoder)."""
    out = encoder_variants(sam, views, device, warmup, iters, compile_encoder)
    default = sam.encoder_attention
    out["encoder_s"] = out[f"encoder_{default}_s"]
    emb = sam.embed(views)
    if compile_decoder:
        out["decoder_variants"] = decoder_variants(sam, emb, device, warmup, iters, (sam.decoder_attention,),
                                                   (False, True))
    for mode in ("batched", "per_image"):
        for bf16 in ((True, False) if device.type == "cuda" else (False,)):
            with sam_settings(sam, decode_mode=mode, decoder_bf16=bf16):
                t = seconds_per_batch(lambda: sam.automatic_masks(emb), device, warmup, iters)
            out[f"masks_{mode}_{'bf16' if bf16 else 'fp32'}_s"] = t
    if device.type == "cuda":
        with sam_settings(sam, decoder_bf16=False):
            ref = sam.mask_candidates(emb)
        with sam_settings(sam, decoder_bf16=True):
            low = sam.mask_candidates(emb)
        out["decoder_bf16_vs_fp32_mask_iou"] = mask_iou(ref["masks"], low["masks"]) \
            if ref["masks"].shape == low["masks"].shape else float("nan")
        out["decoder_bf16_vs_fp32_max_iou_pred_diff"] = float((ref["iou"] - low["iou"]).abs().max()) \
            if ref["iou"].shape == low["iou"].shape else float("nan")
        with sam_settings(sam, bf16=False):
            emb32 = sam.embed(views)
        out["encoder_bf16_vs_fp32_rel_l2"] = float((emb - emb32).norm() / emb32.norm())
    return out


def profile_anchor(name: str, anchor: AnchorModel, views: torch.Tensor, device: torch.device, top: int = 25) -> dict:
    """One ``anchor.compute`` under torch.profiler: the top operators by self device time (CPU time on the CPU),
    printed and returned with the call's total; for SAM also the time of its parts (encoder, mask decoding and
    selection, copies to the host)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        if isinstance(anchor, SamAnchor):
            with record_function("sam.embed"):
                emb = anchor.embed(views)
                sync(device)
            with record_function("sam.automatic_masks"):
                masks = anchor.automatic_masks(emb)
                sync(device)
            with record_function("sam.to_host"):
                to_host({"embedding": emb, "masks": masks.masks})
        else:
            with record_function(f"{name}.compute"):
                anchor.compute(views)
                sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    mine = (f"{name}.", "sam.")
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events if not e.key.startswith(mine))
    parts = {e.key: e.cpu_time_total / 1000 for e in events if e.key.startswith(mine)}  # wall ms, synced
    print(f"--- profile of one {name}.compute of {len(views)} images, by {key}: total {total / 1000:.1f} ms; parts "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))
    return {"total_ms": total / 1000, "parts_ms": parts,
            "top": [{"op": e.key, "ms": getattr(e, key) / 1000, "calls": e.count}
                    for e in rows if not e.key.startswith(mine)][:top]}


def decoder_variants(sam: SamAnchor, emb: torch.Tensor, device, warmup, iters, attentions: tuple[str, ...],
                     compiled: tuple[bool, ...], fused: tuple[bool, ...] = (False,),
                     reads: tuple[str, ...] = ("batch",), bf16_tokens: tuple[bool, ...] = (False,),
                     point_batches: tuple[int | None, ...] = (None,)) -> dict[str, dict]:
    """Mask generation of the same embeddings with each ``precompute.sam.decoder_attention`` x
    ``compile_decoder`` x ``fused_masks`` x ``SamAnchor.candidate_reads`` x ``decoder_tokens_bf16`` x
    ``point_batch_size`` (None: the anchor's) setting, side by side: seconds per batch, and how far each one's
    candidates are from the first setting's (their count, the mean IoU of their masks), and on CUDA the peak memory
    allocated while it was timed. Keyed
    ``<attention>_<eager|compiled>[_fused][_reads_per_call][_bf16_tokens][_pbN]``."""
    out, first = {}, None
    settings = itertools.product(point_batches, bf16_tokens, reads, fused, compiled, attentions)
    for point_batch, tokens, candidate_reads, fused_masks, compile_decoder, attention in settings:
        with sam_settings(sam, decoder_attention=attention, compile_decoder=compile_decoder,
                          fused_masks=fused_masks, candidate_reads=candidate_reads, decoder_tokens_bf16=tokens), \
                sam_settings(sam.amg, point_batch_size=point_batch or sam.amg.point_batch_size):
            sam.automatic_masks(emb)  # compiles
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = seconds_per_batch(lambda: sam.automatic_masks(emb), device, warmup, iters)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            masks = sam.mask_candidates(emb)["masks"]
        first = masks if first is None else first
        same = masks.shape == first.shape
        name = (f"{attention}_{'compiled' if compile_decoder else 'eager'}{'_fused' if fused_masks else ''}"
                f"{'_reads_per_call' if candidate_reads == 'call' else ''}{'_bf16_tokens' if tokens else ''}"
                f"{f'_pb{point_batch}' if point_batch else ''}")
        out[name] = {"s": seconds, "candidates": len(masks), "peak_gib": peak,
                     "mask_iou_vs_first": mask_iou(first, masks) if same else None}
    return out


def print_decoder_variants(bs: int, variants: dict[str, dict]) -> None:
    first = next(iter(variants))
    for name, v in variants.items():
        iou = "different candidates" if v["mask_iou_vs_first"] is None else f"{v['mask_iou_vs_first']:.4f}"
        print(f"  sam mask generation, decoder {name}: {bs / v['s']:.2f} images/s, "
              f"{variants[first]['s'] / v['s']:.2f}x {first}; {v['candidates']} candidates, mask IoU with {first} "
              f"{iou}" + (f"; peak {v['peak_gib']:.1f} GiB" if v.get("peak_gib") is not None else ""))


def write_cost(name: str, anchor: AnchorModel, outputs: dict[str, np.ndarray]) -> float:
    """CPU seconds per image of ``CacheWriter.write_targets`` for one shard of these outputs."""
    from shards.writer import CacheWriter

    n = len(next(iter(outputs.values())))
    records = [Record(i, i, f"bench{i}", [PHOTOS[i % len(PHOTOS)]], []) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter(tmp, records, n)
        decoders = anchor.export_decoders(writer.decoders_dir)
        writer.declare_anchor(name, anchor.dims(), {"bench": True}, decoders)
        start = time.perf_counter()
        writer.write_targets(0, name, outputs)
        return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run with the tiny variants")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,16; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="fp32 matrix products in TF32 (precompute.tf32; the 7B configs' and the reference's setting)")
    ap.add_argument("--points-per-side", type=int, default=None,
                    help="SAM's automatic mask grid (default: precompute.sam's, 32; quick: 8)")
    ap.add_argument("--point-batch-size", type=int, default=None,
                    help="precompute.sam.point_batch_size for the rows: grid prompts per mask-decoder call "
                         "(default: precompute.sam's, 256)")
    ap.add_argument("--sam-attention", choices=ATTENTION_MODES, default=None,
                    help="SAM encoder attention for the per-anchor rows (default: SamAnchor's)")
    ap.add_argument("--unpadded-windows", action="store_true",
                    help="the rows with precompute.sam.unpadded_windows; --encoder-variants times it beside the "
                         "library's padded windows")
    ap.add_argument("--compile-encoder", action="store_true",
                    help="the rows with precompute.sam.compile_encoder (compiles once, minutes at vit_h); the SAM "
                         "details time it against eager")
    ap.add_argument("--decoder-attention", choices=DECODER_ATTENTIONS, default=None,
                    help="precompute.sam.decoder_attention for the rows (default: SamAnchor's)")
    ap.add_argument("--compile-decoder", action="store_true",
                    help="the rows with precompute.sam.compile_decoder; the SAM details time it against eager")
    ap.add_argument("--fused-masks", action="store_true",
                    help="the rows with precompute.sam.fused_masks (CUDA); --decoder-variants times it beside the "
                         "logits' path")
    ap.add_argument("--mask-kernel", choices=["auto", "subpixels", "grouped"], default="auto",
                    help="precompute.sam.mask_kernel: the Triton kernel --fused-masks runs")
    ap.add_argument("--mask-launch", default=None, metavar="CONFIG",
                    help="a fixed launch configuration of the fused mask kernel instead of its autotuner's (named as "
                         "in bench_mask_kernel.py: BLOCKxWARPSxSUBPIXELS or gBLOCKxWARPSxGROUP)")
    ap.add_argument("--decoder-variants", nargs="?", const=",".join(DECODER_ATTENTIONS), default=None,
                    metavar="ATTENTIONS",
                    help="time SAM's mask generation with each precompute.sam.decoder_attention (all, or the "
                         "comma-separated ones given; and compiled, with --compile-decoder; and fused, with "
                         "--fused-masks) on the last batch, side by side")
    ap.add_argument("--candidate-reads", default="batch",
                    help="comma-separated SamAnchor.candidate_reads for --decoder-variants: batch (the kept "
                         "candidates read back once per batch), call (after every decoder call)")
    ap.add_argument("--variant-point-batch-sizes", default=None, metavar="N,N",
                    help="for --decoder-variants: each of these precompute.sam.point_batch_size (default: the rows')")
    ap.add_argument("--variants-at-row-settings", action="store_true",
                    help="--decoder-variants keep the rows' compiled decoder, fused masks and decoder tokens instead "
                         "of timing each both ways")
    ap.add_argument("--bf16-decoder-tokens", action="store_true",
                    help="precompute.sam.decoder_tokens_bf16 for the rows (the mask decoder's per-prompt image tokens "
                         "in bf16 between its layers; on in the config's default, off in the rows unless given), and "
                         "--decoder-variants both ways")
    ap.add_argument("--anchor-streams", action="store_true",
                    help="also time sam+depth+dino with depth and dino in a second thread on a CUDA stream of their "
                         "own, beside SAM")
    ap.add_argument("--compile-anchors", default="", metavar="NAMES",
                    help="precompute.compile_anchors for the rows (comma-separated, e.g. depth,dino); each is first "
                         "timed eager and compiled side by side on the largest batch")
    ap.add_argument("--encoder-variants", action="store_true",
                    help="time SAM's image encoder with each precompute.sam.encoder_attention (and compiled, with "
                         "--compile-encoder) on the last batch, side by side")
    ap.add_argument("--profile", action="store_true",
                    help="profile one compute of each anchor on the last batch: its top operators (and where SAM's "
                         "time goes)")
    ap.add_argument("--no-sam-details", dest="sam_details", action="store_false",
                    help="time the anchors only, not SAM's encoder/decoder variants (minutes at 32 points in fp32)")
    args = ap.parse_args(argv)

    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for a CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.quick else "cuda")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2" if args.quick else "8,16")).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    iters = args.iters if args.iters is not None else (1 if args.quick else 5)
    use_tf32(args.tf32)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, dtype {args.dtype}, "
              f"fp32 matrix products {'TF32' if tf32_matmuls() else 'IEEE fp32'}")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), tiny variants, torch {torch.__version__}")

    anchors = build_anchors(device, args.quick, args.dtype, args.points_per_side)
    if args.sam_attention:
        anchors["sam"].encoder_attention = args.sam_attention
    anchors["sam"].compile_decoder = args.compile_decoder
    anchors["sam"].compile_encoder = args.compile_encoder
    anchors["sam"].unpadded_windows = args.unpadded_windows
    anchors["sam"].fused_masks = args.fused_masks
    anchors["sam"].decoder_tokens_bf16 = args.bf16_decoder_tokens
    anchors["sam"].mask_kernel = args.mask_kernel
    if args.mask_launch:
        anchors["sam"].mask_launch = parse_launch(args.mask_launch)
        anchors["sam"].mask_kernel = launch_kernel(anchors["sam"].mask_launch)
    results_compiled = compiled_anchors(anchors, args.compile_anchors, batch_sizes[-1], device, warmup, iters)
    if args.decoder_attention:
        anchors["sam"].decoder_attention = args.decoder_attention
    if args.point_batch_size:
        anchors["sam"].amg.point_batch_size = args.point_batch_size
    print(f"sam encoder attention for the rows: {anchors['sam'].encoder_attention}, "
          f"{anchors['sam'].amg.points_per_side} points per side, compiled decoder {args.compile_decoder}, "
          f"compiled encoder {args.compile_encoder}, unpadded windows {args.unpadded_windows}, "
          f"decoder attention {anchors['sam'].decoder_attention}, "
          f"fused masks {args.fused_masks} ({anchors['sam'].mask_kernel}), "
          f"decoder tokens {'bf16' if args.bf16_decoder_tokens else 'autocast'}, "
          f"{anchors['sam'].amg.point_batch_size} prompts per decoder call")
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "quick": args.quick, "dtype": args.dtype, "tf32": tf32_matmuls(),
                     "sam_points_per_side": anchors["sam"].amg.points_per_side, "batches": {},
                     "compiled_anchors": results_compiled}
    for bs in batch_sizes:
        views = {n: photo_batch(a.input_size, bs, device) for n, a in anchors.items()}
        row: dict = {}
        for name, anchor in anchors.items():
            t = seconds_per_batch(lambda a=anchor, v=views[name]: a.compute(v), device, warmup, iters)
            row[name] = bs / t
        t = seconds_per_batch(lambda v=views: [a.compute(v[n]) for n, a in anchors.items()], device, warmup, iters)
        row["sam+depth+dino"] = bs / t
        if args.anchor_streams:
            t = seconds_beside_sam(anchors, views, device, warmup, iters)
            row["sam+depth+dino, depth and dino beside sam"] = bs / t
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.sam_details:
            row["sam_details"] = sam_details(anchors["sam"], views["sam"], device, warmup, iters,
                                             args.compile_encoder, args.compile_decoder)
        results["batches"][bs] = row
        print_row(bs, row)

    if args.decoder_variants:
        sam = anchors["sam"]
        emb = sam.embed(views["sam"])
        def both(on: bool) -> tuple[bool, ...]:  # a setting the rows have on: timed both ways, or as the rows
            return ((True,) if args.variants_at_row_settings else (False, True)) if on else (False,)

        attentions = tuple(args.decoder_variants.split(","))
        reads = tuple(args.candidate_reads.split(","))
        point_batches = tuple(int(n) for n in args.variant_point_batch_sizes.split(",")) \
            if args.variant_point_batch_sizes else (None,)
        results["decoder_variants"] = decoder_variants(
            sam, emb, device, warmup, iters, attentions, both(args.compile_decoder), both(args.fused_masks), reads,
            both(args.bf16_decoder_tokens), point_batches)
        print(f"\nbatch {len(emb)}, SAM's mask generation alone:")
        print_decoder_variants(len(emb), results["decoder_variants"])
    if args.encoder_variants:
        sam = anchors["sam"]
        results["encoder_variants"] = encoder_variants(sam, views["sam"], device, warmup, iters, args.compile_encoder)
        bs = len(views["sam"])
        print(f"\nbatch {bs}, SAM's image encoder alone:")
        for key, value in results["encoder_variants"].items():
            print(f"  {key}: " + (f"{bs / value:.2f} images/s" if key.endswith("_s") else f"{value:.2e}"))
    if args.profile:
        results["profiles"] = {n: profile_anchor(n, a, views[n], device) for n, a in anchors.items()}
    outputs = {n: a.compute(views[n]) for n, a in anchors.items()}
    results["write_targets_s_per_image"] = {n: write_cost(n, anchors[n], outputs[n]) for n in anchors}
    print("CacheWriter.write_targets, CPU seconds per image (bf16 codec, zstd, checksums): "
          + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in results["write_targets_s_per_image"].items()))
    best = max(r["sam+depth+dino"] for r in results["batches"].values())
    print(f"\nreference: anchors recomputed inside every training step, ~{REFERENCE_SECONDS_PER_IMAGE} s per image "
          f"on an H100 (~{1 / REFERENCE_SECONDS_PER_IMAGE:.2f} images/s), paid again on every epoch and stage")
    points = anchors["sam"].amg.points_per_side
    target = target_images_per_s(points)
    print(f"here: sam+depth+dino {best:.1f} images/s once = {best * REFERENCE_SECONDS_PER_IMAGE:.0f}x the reference's "
          f"per-step rate; target at {points} points per side >= {target:.0f} images/s on one GPU: "
          f"{'met' if best >= target else 'NOT met'}"
          f"{' (quick run: tiny models, not comparable)' if args.quick else ''}")
    if args.fused_masks and device.type == "cuda" and not args.mask_launch:
        kernel = kernel_for(args.mask_kernel, fused_keys_dtype(args.dtype == "bf16", True), True)
        results["mask_kernel_config"] = str(MASK_KERNELS[kernel][1].best_config)
        print(f"the fused mask kernel ({kernel}) autotuned launch: {results['mask_kernel_config']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_row(bs: int, row: dict) -> None:
    anchors = ["sam", "depth", "dino", "sam+depth+dino"]
    print(f"\nbatch {bs}: images/s  " + "  ".join(f"{n} {row[n]:7.2f}" for n in anchors)
          + (f"  (peak {row['peak_gib']:.1f} GiB)" if "peak_gib" in row else ""))
    combined = row["sam+depth+dino"]
    print("  share of combined time: " + ", ".join(f"{n} {combined / row[n]:.0%}" for n in anchors[:3]))
    beside = row.get("sam+depth+dino, depth and dino beside sam")
    if beside is not None:
        print(f"  sam+depth+dino with depth and dino beside sam (a second thread and stream): {beside:.2f} images/s, "
              f"{beside / combined:.2f}x one after another")
    if "sam_details" not in row:
        return
    d = row["sam_details"]
    lib = d["encoder_library_s"]
    print("  sam encoder img/s (x library): " + ", ".join(
        f"{k[8:-2]} {bs / v:.1f} ({lib / v:.2f}x)" for k, v in d.items()
        if k.startswith("encoder_") and k.endswith("_s") and k != "encoder_s"))
    drift = "_vs_library_rel_l2"
    print("  sam encoder drift from library attention (rel L2): " + ", ".join(
        f"{k[8:-len(drift)]} {v:.2g}" for k, v in d.items()
        if k.endswith(drift) and k != f"encoder_library{drift}"))
    print("  sam mask generation img/s: "
          + ", ".join(f"{k[6:-2]} {bs / v:.1f}" for k, v in d.items() if k.startswith("masks_")))
    for dt in ("bf16", "fp32"):
        if f"masks_per_image_{dt}_s" in d:
            speedup = d[f"masks_per_image_{dt}_s"] / d[f"masks_batched_{dt}_s"]
            print(f"  sam mask generation {dt}: batched (sam_fast) {speedup:.2f}x per image (MaskDecoder.forward)")
    if "decoder_variants" in d:
        print_decoder_variants(bs, d["decoder_variants"])
    for k in ("decoder_bf16_vs_fp32_mask_iou", "decoder_bf16_vs_fp32_max_iou_pred_diff", "encoder_bf16_vs_fp32_rel_l2"):
        if k in d:
            print(f"  sam {k}: {d[k]:.4g}")


if __name__ == "__main__":
    sys.exit(main())
