"""SAM head: each thought token is one sparse prompt of SAM's frozen mask decoder.

The decoder is rebuilt with segment_anything's own classes from
``decoders/sam_decoder.pt`` (written by precompute). The image embedding is the
cached target ``embedding``; the dense prompt is the prompt encoder's
``no_mask_embed``. All prompts of a batch are decoded in one pass
(:func:`decode_prompts`); the loss Hungarian-matches the predicted masks to the
cached reference masks (dice + BCE) and pushes unmatched predictions to
background.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from .base import AnchorHead, DimsSource, FrozenDecoder, TokenProjection, missing_decoder_error, resize_maps

DECODER_FILE = "sam_decoder.pt"
_REQUIRED_KEYS = ("prompt_embed_dim", "image_embedding_size", "input_image_size", "mask_in_chans", "transformer",
                  "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim", "prompt_encoder", "mask_decoder")


class SamDecoder(nn.Module):
    """SAM's prompt encoder + mask decoder as segment_anything builds them."""

    def __init__(self, spec: dict):
        super().__init__()
        t = spec["transformer"]
        self.prompt_encoder = PromptEncoder(
            embed_dim=int(spec["prompt_embed_dim"]),
            image_embedding_size=tuple(int(s) for s in spec["image_embedding_size"]),
            input_image_size=tuple(int(s) for s in spec["input_image_size"]),
            mask_in_chans=int(spec["mask_in_chans"]),
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=int(spec["prompt_embed_dim"]),
            transformer=TwoWayTransformer(depth=int(t["depth"]), embedding_dim=int(t["embedding_dim"]),
                                          mlp_dim=int(t["mlp_dim"]), num_heads=int(t["num_heads"])),
            num_multimask_outputs=int(spec["num_multimask_outputs"]),
            iou_head_depth=int(spec["iou_head_depth"]),
            iou_head_hidden_dim=int(spec["iou_head_hidden_dim"]),
        )
        self.prompt_encoder.load_state_dict(spec["prompt_encoder"])
        self.mask_decoder.load_state_dict(spec["mask_decoder"])
        # fixed for a given decoder: compute once in fp32 instead of every step
        with torch.no_grad():
            self.register_buffer("dense_pe", self.prompt_encoder.get_dense_pe(), persistent=False)


def load_sam_decoder_spec(path: Path) -> dict:
    if not path.is_file():
        raise missing_decoder_error("sam", path)
    spec = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in _REQUIRED_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{path}: not a SAM decoder file, missing keys {missing}")
    return spec


def decode_prompts(decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                   dense_embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Single-mask logits for K prompts per image, all B*K prompts in one pass.

    ``image_embeddings`` (B, C, h, w); ``image_pe`` (1, C, h, w); ``dense_embedding``
    broadcastable to (1, C, h, w); ``prompts`` (B, K, C), each a one-token sparse
    prompt for its own image. Returns (B, K, 4h, 4w). Same maths as
    ``MaskDecoder.forward(..., multimask_output=False)`` called per image, which
    can take only one image per call (it repeat-interleaves a single embedding).
    """
    b, k, c = prompts.shape
    _, _, h, w = image_embeddings.shape
    n = b * k
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.to(prompts.dtype).unsqueeze(0).expand(n, -1, -1)
    tokens = torch.cat([output_tokens, prompts.reshape(n, 1, c)], dim=1)
    # the two-way transformer updates the image embedding per prompt, so each prompt needs its own copy
    src = torch.repeat_interleave(image_embeddings, k, dim=0) + dense_embedding
    hs, src = decoder.transformer(src, image_pe, tokens)  # image_pe broadcasts over the batch
    single_mask_token = hs[:, 1, :]  # mask token 0 = the single-output mask
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](single_mask_token)  # (n, C/8)
    masks = torch.einsum("nc,nchw->nhw", hyper, upscaled)
    return masks.reshape(b, k, *masks.shape[-2:])


# ------------------------------------------------------------------- matching
def pairwise_mask_cost(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """dice + BCE cost between every prediction and every reference mask.

    ``logits`` (B, P, H, W), ``masks`` (B, M, H, W) in {0, 1}; returns (B, P, M).
    BCE is the per-pixel mean, written as matrix products so no (P, M, H, W) tensor exists.
    """
    x = logits.flatten(2).float()
    t = masks.flatten(2).float()
    hw = x.shape[-1]
    bce = (F.softplus(-x) @ t.transpose(1, 2) + F.softplus(x) @ (1 - t).transpose(1, 2)) / hw
    p = x.sigmoid()
    inter = p @ t.transpose(1, 2)
    dice = 1 - (2 * inter + 1) / (p.sum(-1, keepdim=True) + t.sum(-1).unsqueeze(1) + 1)
    return bce + dice


def match_masks(cost: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Hungarian matching per image: (B, P) index of the reference mask each prediction gets, -1 if none.

    Only the first ``counts[b]`` reference masks of image b are real.
    """
    cost_np = cost.detach().float().cpu().numpy()
    counts_np = counts.detach().cpu().numpy()
    b, p, m = cost_np.shape
    assignment = np.full((b, p), -1, dtype=np.int64)
    for i in range(b):
        n = int(min(max(counts_np[i], 0), m))
        if n == 0:
            continue
        rows, cols = linear_sum_assignment(cost_np[i, :, :n])
        assignment[i, rows] = cols
    return torch.from_numpy(assignment).to(cost.device)


def matched_mask_loss(logits: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean dice + BCE of matched predictions to their references + mean BCE of the rest to background."""
    logits = logits.float()
    masks = masks.float()
    with torch.no_grad():
        assignment = match_masks(pairwise_mask_cost(logits, masks), counts)
    matched = assignment >= 0
    index = assignment.clamp(min=0)
    target = torch.gather(masks, 1, index[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    target = target * matched[:, :, None, None]  # unmatched -> all-zero background
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
    p = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    # each group its own mean, so the many background predictions of an image with few
    # reference masks do not drown the mask terms (and vice versa)
    background = ~matched
    mask_loss = ((bce + dice) * matched).sum() / matched.sum().clamp(min=1)
    background_loss = (bce * background).sum() / background.sum().clamp(min=1)
    return mask_loss + background_loss


class SamHead(AnchorHead):
    """Thought tokens -> SAM sparse prompts -> frozen mask decoder -> Hungarian-matched mask loss."""

    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "sam"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        self.decoder_path = Path(cache.decoders_dir) / DECODER_FILE
        spec = load_sam_decoder_spec(self.decoder_path)
        d = self.dims
        embed_size = tuple(int(s) for s in spec["image_embedding_size"])
        if int(spec["prompt_embed_dim"]) != d["embed_dim"] or embed_size != (d["embed_h"], d["embed_w"]):
            raise ValueError(
                f"{self.decoder_path}: decoder expects image embeddings {spec['prompt_embed_dim']}x{embed_size} "
                f"but the cache's sam/embedding is {d['embed_dim']}x{(d['embed_h'], d['embed_w'])}")
        self.prompt_dim = d["embed_dim"]
        self.mask_size = (d["mask_h"], d["mask_w"])
        self.project = TokenProjection(self.hidden_size, self.prompt_dim)
        self.frozen = FrozenDecoder("sam_decoder", lambda device: SamDecoder(spec).to(device).eval())

    @property
    def decoder_files(self) -> list[Path]:
        return [self.decoder_path]

    def decode(self, thoughts: torch.Tensor, targets: Optional[dict] = None, views=None) -> torch.Tensor:
        """Low-res mask logits (B, tokens, mask_h, mask_w), one mask per thought token."""
        embedding = self.target(targets, "embedding", thoughts.shape[0])
        sam = self.frozen.on(thoughts.device)
        prompts = self.project(thoughts)
        if not torch.is_autocast_enabled(thoughts.device.type):
            # the frozen decoder stays fp32 (see FrozenDecoder); without autocast feed it fp32
            prompts = prompts.float()
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        logits = decode_prompts(sam.mask_decoder, embedding.to(prompts.dtype), sam.dense_pe.to(prompts.dtype),
                                dense.to(prompts.dtype), prompts)
        return resize_maps(logits, self.mask_size)

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        b = prediction.shape[0]
        masks = self.target(targets, "masks", b)
        counts = self.target(targets, "mask_count", b)
        return matched_mask_loss(prediction, masks, counts)
