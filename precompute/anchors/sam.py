"""SAM anchor: image embedding + reference masks from a fast, batched automatic mask generation.

Input: the square view at the image encoder's ``img_size`` (1024 for the real
models), normalised with SAM's pixel mean/std; no padding is needed because the
view is already square at that size.

Targets (names from ``covt.anchors``):
- ``embedding``: the image encoder output (256 x 64 x 64 for the real models);
- ``masks``: up to ``precompute.sam.max_masks`` reference masks at the mask
  decoder's low-res size (4x the embedding side: 256 x 256), best first;
- ``mask_count``: how many of ``masks`` are real (the rest are all-false).

Automatic mask generation follows SAM's recipe (a grid of single-point prompts,
multimask output, predicted-IoU and stability thresholds, box NMS) but runs all
images of a batch at once on the device: grid prompts are embedded once, the
mask decoder's submodules decode prompts of many images in one call, the
stability score is computed on the low-res logits (SAM upsamples to the
original size first, which costs 16x more and changes the score only at the
boundary), the masks of a prompt are made only when one of its predicted IoUs
passes the threshold (``precompute.sam.iou_first``: the threshold would drop
them all), and nothing goes through RLE or per-mask CPU work. Masks are ranked
by predicted IoU x stability score (the reference's top 8); box NMS ranks duplicates
by ``precompute.sam.nms_score``: predicted IoU as SamAutomaticMaskGenerator does, or
the same IoU x stability.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torchvision.ops import batched_nms

from covt.anchors import SAM_DECODER_FILE
from covt.compute import autocast
from covt.config import CheckpointConfig, PrecomputeConfig, SamPrecomputeConfig
from covt.fs import atomic_file, atomic_save

from .base import AnchorModel, checkpoint_file, to_host
from .sam_fast import (
    decode_outputs,
    encoder_attention,
    multimask_logits,
    unpadded_windows,
    use_encoder_attention,
    use_unpadded_windows,
)
from .sam_masks import kernel_for, mask_statistics, statistics_of_logits
from .sam_masks import runs_on as fused_masks_run_on

CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
STABILITY_OFFSET = 1.0  # SAM's default: IoU of the masks thresholded at logit +1 and -1


def build_sam_vit_tiny(checkpoint: str | None = None) -> Sam:
    """A small SAM of the real classes: 256 px input, 16x16x32 embedding, 64x64 low-res masks."""
    img_size, patch, dim = 256, 16, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
            out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=8, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size), mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
    )
    sam.eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


BUILDERS = {**sam_model_registry, "vit_tiny": build_sam_vit_tiny}


def write_random_checkpoint(path: Path, variant: str, seed: int) -> None:
    """A seeded random-weight SAM saved like the released .pth files (a plain state dict)."""
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's RNG
        torch.manual_seed(seed)
        sam = BUILDERS[variant](None)
    with atomic_file(path) as tmp:
        torch.save(sam.state_dict(), tmp)


def decoder_architecture(sam: Sam) -> dict:
    """The constructor arguments of ``sam``'s PromptEncoder and MaskDecoder, read off the modules."""
    pe, md = sam.prompt_encoder, sam.mask_decoder
    t = md.transformer
    return {
        "prompt_embed_dim": pe.embed_dim,
        "image_embedding_size": tuple(pe.image_embedding_size),
        "input_image_size": tuple(pe.input_image_size),
        "mask_in_chans": pe.mask_downscaling[3].out_channels,
        "transformer": {"depth": t.depth, "embedding_dim": t.embedding_dim, "mlp_dim": t.mlp_dim,
                        "num_heads": t.num_heads},
        "num_multimask_outputs": md.num_multimask_outputs,
        "iou_head_depth": md.iou_prediction_head.num_layers,
        "iou_head_hidden_dim": md.iou_prediction_head.layers[0].out_features,
    }


def save_decoders(sam: Sam, out_dir: str | Path) -> list[str]:
    """``SAM_DECODER_FILE`` in ``out_dir``: all the training loss needs to rebuild PromptEncoder + MaskDecoder
    (their constructor arguments and weights), no SAM checkpoint. Returns the file names written."""
    state = {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
             for k, m in (("prompt_encoder", sam.prompt_encoder), ("mask_decoder", sam.mask_decoder))}
    atomic_save(Path(out_dir) / SAM_DECODER_FILE, lambda buffer: torch.save({**decoder_architecture(sam), **state},
                                                                            buffer))
    return [SAM_DECODER_FILE]


@dataclass
class MaskProposals:
    """Automatic masks of a batch, best first; rows past ``count`` are padding."""

    masks: torch.Tensor  # (B, K, H, W) bool
    count: torch.Tensor  # (B,) int
    iou: torch.Tensor  # (B, K) predicted IoU
    stability: torch.Tensor  # (B, K)
    boxes: torch.Tensor  # (B, K, 4) x0, y0, x1, y1 (exclusive) in low-res pixels
    points: torch.Tensor  # (B, K, 2) the prompt point (x, y) in input pixels


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (x0, y0, x1, y1 exclusive) of non-empty bool masks ``(N, H, W)``."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)
    y0 = rows.to(torch.uint8).argmax(-1)
    y1 = h - rows.flip(-1).to(torch.uint8).argmax(-1)
    x0 = cols.to(torch.uint8).argmax(-1)
    x1 = w - cols.flip(-1).to(torch.uint8).argmax(-1)
    return torch.stack([x0, y0, x1, y1], -1)


def point_grid(points_per_side: int, size: int) -> torch.Tensor:
    """SAM's grid of cell-centre points over a ``size`` square, (P, 2) as (x, y), row-major."""
    centres = (torch.arange(points_per_side, dtype=torch.float64) + 0.5) / points_per_side * size
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1).float()


def select_masks(cand: dict[str, torch.Tensor], n_img: int, grid_points: torch.Tensor,
                 max_masks: int, nms_thresh: float, nms_score: str = "iou_x_stability") -> MaskProposals:
    """Box NMS per image (duplicates ranked by ``nms_score``: "pred_iou" as SamAutomaticMaskGenerator, or
    "iou_x_stability"), then the ``max_masks`` survivors of each image with the best ``score`` (predicted
    IoU x stability, the reference's top 8), best first.

    ``cand`` holds flat candidates: ``masks`` (N, H, W) bool, ``boxes`` (N, 4), ``score``,
    ``iou``, ``stability``, ``image`` (index in the batch) and ``point`` (index in ``grid_points``).
    """
    ranking = {"pred_iou": cand["iou"], "iou_x_stability": cand["score"]}[nms_score]
    keep = batched_nms(cand["boxes"].float(), ranking.float(), cand["image"], nms_thresh)
    # best score first, then a stable sort by image keeps that order within each image
    keep = keep[torch.sort(cand["score"][keep], descending=True, stable=True).indices]
    keep = keep[torch.sort(cand["image"][keep], stable=True).indices]
    img = cand["image"][keep]
    per_image = torch.bincount(img, minlength=n_img)
    rank = torch.arange(len(keep), device=img.device) - (per_image.cumsum(0) - per_image)[img]
    top = rank < max_masks
    keep, img, rank = keep[top], img[top], rank[top]
    h, w = cand["masks"].shape[-2:]

    def table(values: torch.Tensor, shape: tuple, dtype) -> torch.Tensor:
        t = torch.zeros((n_img, max_masks, *shape), dtype=dtype, device=values.device)
        t[img, rank] = values[keep].to(dtype)
        return t

    return MaskProposals(
        masks=table(cand["masks"], (h, w), torch.bool),
        count=per_image.clamp(max=max_masks),
        iou=table(cand["iou"], (), torch.float32),
        stability=table(cand["stability"], (), torch.float32),
        boxes=table(cand["boxes"], (4,), torch.int64),
        points=table(grid_points[cand["point"]], (2,), torch.float32),
    )


def fused_keys_dtype(decoder_bf16: bool, on_gpu: bool) -> torch.dtype:
    """The image tokens' dtype the fused mask kernel gets (and multiplies in): the decoder's products' dtype under
    autocast, bf16 only on a GPU."""
    return torch.bfloat16 if decoder_bf16 and on_gpu else torch.float32


def decoder_tokens_dtype(decoder_bf16: bool, tokens_bf16: bool, on_gpu: bool) -> torch.dtype | None:
    """The dtype the mask decoder keeps each prompt's image tokens in between its layers (None: autocast's float32;
    ``precompute.sam.decoder_tokens_bf16``), bf16 only where the decoder's products are."""
    return torch.bfloat16 if tokens_bf16 and fused_keys_dtype(decoder_bf16, on_gpu) == torch.bfloat16 else None


def kept_candidates(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The candidates of all decoder calls whose ``keep`` is set, concatenated. The kept counts are read back once
    for the batch, not once per call and field (a boolean index waits for the GPU each time); each field is then
    gathered into its place in one preallocated tensor. The price: every decoded mask of the batch stays on the GPU
    until then, kept or not (3 x 256 x 256 bytes per prompt decoded: 3.2 GB for 16 images at 32 points per side,
    what the bench's thresholds at 0 kept before as well)."""
    counts = torch.stack([c["keep"].sum() for c in chunks]).tolist()
    out: dict[str, torch.Tensor] = {}
    for key in ("masks", "iou", "stability", "image", "point"):
        first = chunks[0][key]
        out[key] = torch.empty((sum(counts), *first.shape[1:]), dtype=first.dtype, device=first.device)
    start = 0
    for chunk, count in zip(chunks, counts, strict=True):
        index = torch.nonzero_static(chunk["keep"], size=count).squeeze(1)
        for key, values in out.items():
            torch.index_select(chunk[key], 0, index, out=values[start:start + count])
        start += count
    return out


@cache
def compiled_decoding():
    """:func:`decode_outputs` and :func:`multimask_logits` through torch.compile, built once per process (the
    compiled code guards on the SAM it is given)."""
    return torch.compile(decode_outputs), torch.compile(multimask_logits)


class SamAnchor(AnchorModel):
    name = "sam"
    network = None  # precompute.sam.compile_encoder and compile_decoder

    def __init__(self, sam: Sam, amg: SamPrecomputeConfig, *, variant: str, checkpoint: str,
                 checkpoint_sha256: str | None = None, bf16: bool):
        super().__init__()
        self.sam = sam.eval().requires_grad_(False)
        self.amg = amg
        self.variant = variant
        self.checkpoint = checkpoint
        self._checkpoint_sha256 = checkpoint_sha256  # None: hashed when first fingerprinted (rank 0 only)
        self.bf16 = bf16
        # Decoding prompts of several images per mask-decoder call ("batched") versus one
        # image's prompts per call through MaskDecoder.forward ("per_image"); bench compares.
        self.decode_mode = "batched"
        # The mask decoder runs under bf16 autocast too when bf16 is on; bench/bench_precompute.py
        # measures how far its masks move from fp32 (set False to keep it fp32).
        self.decoder_bf16 = bf16
        # The image encoder's attention: segment_anything's own ("library") or the same function
        # through fused SDPA kernels ("sdpa_bias", "sdpa_fold"; see sam_fast.py). The bench compares.
        self.encoder_attention = amg.encoder_attention
        self.unpadded_windows = amg.unpadded_windows
        # torch.compile the image encoder on first use (default off: compiling takes minutes at vit_h size)
        self.compile_encoder = amg.compile_encoder
        self._compiled_encoder: tuple | None = None
        # torch.compile the batched prompt decoding (decode_outputs, multimask_logits) on first use
        self.compile_decoder = amg.compile_decoder
        self.decoder_attention = amg.decoder_attention
        self.decoder_tokens_bf16 = amg.decoder_tokens_bf16
        # on CUDA, the masks' upscaling and their statistics in one Triton kernel (sam_masks.py), no logits written
        self.fused_masks = amg.fused_masks
        self.mask_kernel = amg.mask_kernel
        self.mask_launch: dict | None = None  # a fixed launch configuration instead of the autotuner's (bench)
        # "batch": the kept candidates' counts read back once per batch; "call": after every decoder call, one wait for
        # the GPU each (the bench's baseline, bench_precompute.py --candidate-reads)
        self.candidate_reads = "batch"
        self.input_size = sam.image_encoder.img_size
        grid = point_grid(amg.points_per_side, self.input_size)
        self.register_buffer("grid_points", grid, persistent=False)
        self._grid_sparse: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def dims(self) -> dict[str, int]:
        eh, ew = self.sam.prompt_encoder.image_embedding_size
        return {"embed_dim": self.sam.prompt_encoder.embed_dim, "embed_h": eh, "embed_w": ew,
                "max_masks": self.amg.max_masks, "mask_h": 4 * eh, "mask_w": 4 * ew}

    # ------------------------------------------------------------------ encoder
    @property
    def encoder_attention(self) -> str:
        return encoder_attention(self.sam.image_encoder)

    @encoder_attention.setter
    def encoder_attention(self, mode: str) -> None:
        use_encoder_attention(self.sam.image_encoder, mode)
        self._compiled_encoder = None

    @property
    def unpadded_windows(self) -> bool:
        return unpadded_windows(self.sam.image_encoder)

    @unpadded_windows.setter
    def unpadded_windows(self, on: bool) -> None:
        use_unpadded_windows(self.sam.image_encoder, on)
        self._compiled_encoder = None

    def _encoder(self):
        if not self.compile_encoder:
            return self.sam.image_encoder
        if self._compiled_encoder is None:
            # kept in a tuple: a bare OptimizedModule attribute would register as a submodule
            self._compiled_encoder = (torch.compile(self.sam.image_encoder),)
        return self._compiled_encoder[0]

    @torch.no_grad()
    def embed(self, views: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(B, C, h, w)`` float32 of uint8 ``(B, S, S, 3)`` views."""
        x = views.to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        with autocast(self.device, self.bf16):
            return self._encoder()(x).float()

    # ------------------------------------------------------------------ decoder
    def grid_sparse_embeddings(self) -> torch.Tensor:
        """Prompt-encoder embeddings of the grid points ``(P, 2, C)`` (image-independent)."""
        if self._grid_sparse is None or self._grid_sparse.device != self.device:
            pts = self.grid_points[:, None, :]
            labels = torch.ones(pts.shape[0], 1, dtype=torch.int, device=pts.device)
            sparse, _ = self.sam.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
            self._grid_sparse = sparse
        return self._grid_sparse

    def _decode_batched(self, emb: torch.Tensor, img: torch.Tensor, pt: torch.Tensor):
        """Multimask logits ``(k, M, H, W)`` and IoU ``(k, M)`` of the prompts (image ``img``, point ``pt``) at
        index ``live`` (k of the n), and ``live``.

        MaskDecoder.predict_masks pairs one image with all prompts of a call; this applies its submodules
        (sam_fast.decode_outputs) to prompts of many images. With ``precompute.sam.iou_first`` the masks of a
        prompt are made only if one of its predicted IoUs passes ``pred_iou_thresh`` (the others' masks
        would all be dropped by that threshold).
        """
        outputs, logits = compiled_decoding() if self.compile_decoder else (decode_outputs, multimask_logits)
        fused = self.fused_masks and fused_masks_run_on(emb.device)
        keys_dtype = fused_keys_dtype(self.decoder_bf16, emb.is_cuda) if fused else None
        tokens_dtype = decoder_tokens_dtype(self.decoder_bf16, self.decoder_tokens_bf16, emb.is_cuda)
        mask_tokens, keys, iou = outputs(self.sam, emb, img, self.grid_sparse_embeddings()[pt],
                                         self.decoder_attention, keys_dtype, tokens_dtype)
        live = torch.arange(len(pt), device=pt.device)
        if self.amg.iou_first and self.amg.pred_iou_thresh > 0:
            live = live[(iou > self.amg.pred_iou_thresh).any(1)]
            if len(live) < len(pt):
                mask_tokens, keys, iou = mask_tokens[live], keys[live], iou[live]
        if fused:
            stats = mask_statistics(self.sam, keys, mask_tokens, self.sam.mask_threshold, STABILITY_OFFSET,
                                    launch=self.mask_launch, kernel=self.mask_kernel)
        else:
            stats = statistics_of_logits(logits(self.sam, keys, mask_tokens), self.sam.mask_threshold,
                                         STABILITY_OFFSET)
        return stats, iou, live

    def _decode_per_image(self, emb: torch.Tensor, img: torch.Tensor, pt: torch.Tensor):
        pe = self.sam.prompt_encoder
        sparse = self.grid_sparse_embeddings()
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        logits, ious = [], []
        for i in torch.unique_consecutive(img).tolist():
            sel = img == i
            lg, iou = self.sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse[pt[sel]],
                                            dense_prompt_embeddings=dense, multimask_output=True)
            logits.append(lg)
            ious.append(iou)
        stats = statistics_of_logits(torch.cat(logits), self.sam.mask_threshold, STABILITY_OFFSET)
        return stats, torch.cat(ious), torch.arange(len(pt), device=pt.device)

    @torch.no_grad()
    def mask_candidates(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every grid-prompt mask of the batch that passes the IoU and stability thresholds."""
        amg = self.amg
        n_img, n_pts = emb.shape[0], self.grid_points.shape[0]
        prompts = torch.arange(n_img * n_pts, device=emb.device)
        decode = self._decode_batched if self.decode_mode == "batched" else self._decode_per_image
        chunks: list[dict[str, torch.Tensor]] = []
        read: list[dict[str, torch.Tensor]] = []  # candidates already read back ("call")
        for chunk in prompts.split(amg.point_batch_size):
            img, pt = chunk // n_pts, chunk % n_pts
            with autocast(self.device, self.decoder_bf16):
                stats, iou, live = decode(emb, img, pt)
            img, pt = img[live], pt[live]
            m = stats.masks.shape[1]
            iou = iou.float().flatten()
            stability = stats.inner.flatten() / stats.outer.flatten().clamp_min(1)
            keep = stats.area.flatten() > 0
            if amg.pred_iou_thresh > 0:
                keep &= iou > amg.pred_iou_thresh
            if amg.stability_score_thresh > 0:
                keep &= stability >= amg.stability_score_thresh
            chunks.append({"masks": stats.masks.flatten(0, 1), "iou": iou, "stability": stability,
                           "image": img.repeat_interleave(m), "point": pt.repeat_interleave(m), "keep": keep})
            if self.candidate_reads == "call":
                read.append(kept_candidates([chunks.pop()]))
        out = {k: torch.cat([r[k] for r in read]) for k in read[0]} if read else kept_candidates(chunks)
        out["boxes"] = mask_boxes(out["masks"])
        out["score"] = out["iou"] * out["stability"]
        return out

    @torch.no_grad()
    def automatic_masks(self, emb: torch.Tensor) -> MaskProposals:
        """Up to ``max_masks`` masks per image after NMS, ranked by predicted IoU x stability."""
        return select_masks(self.mask_candidates(emb), emb.shape[0], self.grid_points,
                            self.amg.max_masks, self.amg.box_nms_thresh, self.amg.nms_score)

    # -------------------------------------------------------------- interface
    @torch.no_grad()
    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        emb = self.embed(views)
        proposals = self.automatic_masks(emb)
        return to_host({"embedding": emb, "masks": proposals.masks, "mask_count": proposals.count.to(torch.int32)})

    def export_decoders(self, out_dir: Path) -> list[str]:
        return save_decoders(self.sam, out_dir)

    def fingerprint(self) -> dict:
        return {
            **self.checkpoint_fields(self.checkpoint),
            "variant": self.variant,
            "preprocessing": (
                f"square view {self.input_size}x{self.input_size} (bicubic, from the original), "
                "(x - pixel_mean) / pixel_std with SAM's mean/std, no padding"
            ),
            "image_encoder_dtype": "bf16" if self.bf16 and self.device.type == "cuda" else "fp32",
            "mask_decoder_dtype": "bf16" if self.decoder_bf16 and self.device.type == "cuda" else "fp32",
            "automatic_masks": {
                "points_per_side": self.amg.points_per_side, "max_masks": self.amg.max_masks,
                "pred_iou_thresh": self.amg.pred_iou_thresh,
                "stability_score_thresh": self.amg.stability_score_thresh,
                "stability_score_offset": STABILITY_OFFSET, "stability_on": "low-res logits",
                "box_nms_thresh": self.amg.box_nms_thresh, "nms_score": self.amg.nms_score,
                "rank": "predicted_iou * stability_score",
            },
            "versions": {"segment_anything": version("segment_anything"), "torch": torch.__version__},
        }


def load_sam(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> SamAnchor:
    variant = ckpt.variant or "vit_h"
    if variant not in BUILDERS:
        raise ValueError(f"precompute.checkpoints.sam.variant: unknown SAM variant {variant!r} "
                         f"(known: {sorted(BUILDERS)})")
    if pre.sam.fused_masks:  # a mask kernel the GPU refuses for these tokens says so before any work
        on_gpu = device.type == "cuda"
        kernel_for(pre.sam.mask_kernel, fused_keys_dtype(pre.dtype == "bf16", on_gpu), on_gpu)
    path = checkpoint_file("sam", ckpt, CHECKPOINT_URLS.get(variant, CHECKPOINT_URLS["vit_h"]),
                           lambda p, seed: write_random_checkpoint(p, variant, seed))
    # build on the target device (no slow CPU init of 600M random weights), then load the file
    with torch.device(device):
        sam = BUILDERS[variant](None)
    try:
        sam.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except RuntimeError as e:
        raise ValueError(f"sam: {path} does not fit SAM variant {variant!r} "
                         f"(precompute.checkpoints.sam.variant): {e}") from None
    return SamAnchor(sam, pre.sam, variant=variant, checkpoint=str(path), bf16=pre.dtype == "bf16").to(device)
