"""SAM head (the reference's): the thoughts become sparse prompts of SAM's frozen mask decoder.

1. :func:`rotary_embedding` on the 8 thought tokens (the reference's ``apply_rope_custome``,
   covt_qwen2_5_vl.py 1246-1269, positions 0..7 along the tokens);
2. :class:`~trainer.heads.attention.ThoughtQueries`: 8 queries, 8 heads, width = SAM's
   prompt dimension (256); output k is prompt k;
3. each prompt alone as a one-token sparse embedding, no points or boxes, the prompt
   encoder's ``no_mask_embed`` as the dense embedding, ``multimask_output=False``
   (594-635); all prompts of a batch go through the decoder in one pass
   (:func:`decode_prompts`);
4. :func:`postprocess_masks`, SAM's own: up to the encoder's input size, crop, down to
   the cached mask size;
5. loss (:func:`sam_token_loss`, 251-298): per image, Hungarian matching on 1 - dice,
   matched predictions dice + BCE, unmatched ones BCE to an empty mask x 0.1, an image
   without reference masks 0; the mean over the images of the batch (1523).

The decoder is rebuilt with segment_anything's own classes from
``decoders/sam_decoder.pt`` (written by precompute); the image embedding is the cached
target ``embedding``.
"""
from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from covt.anchors import SAM_DECODER_FILE, SAM_DECODER_KEYS
from covt.untrusted import load_plain

from .attention import ThoughtQueries
from .base import AnchorHead, DimsSource, FrozenDecoder, missing_decoder_error

NUM_HEADS = 8
UNMATCHED_WEIGHT = 0.1  # BCE-to-empty of the predictions no reference mask was matched to
DICE_EPS = 1e-6


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
    spec = load_plain(path, "SAM decoder")
    missing = [k for k in SAM_DECODER_KEYS if k not in spec]
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


def rotary_embedding(x: torch.Tensor) -> torch.Tensor:
    """The reference's rotary embedding of ``(..., N, K)`` tokens, position n = index along N.

    Channel i of the first half pairs with channel i of the second half and both turn by
    ``n * 10000^(-2i/K)``; an odd K is padded by one zero channel, dropped again after.
    The angles are computed in fp32 (the reference computes them in the tokens' dtype).
    """
    n, k = x.shape[-2], x.shape[-1]
    padded = k + k % 2
    if padded != k:
        x = F.pad(x, (0, 1))
    half = padded // 2
    frequencies = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32)
                            * (-2.0 * math.log(10000.0) / padded))
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * frequencies  # (N, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    turned = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return turned[..., :k]


def postprocess_masks(logits: torch.Tensor, encoder_size: int, input_size: tuple[int, int],
                      out_size: tuple[int, int]) -> torch.Tensor:
    """segment_anything's ``Sam.postprocess_masks`` for ``(..., h, w)`` low-res logits, in fp32.

    Up (bilinear) to the encoder's square input, crop the part the image filled
    (``input_size``; all of it for our square views), then to ``out_size``.
    """
    lead = logits.shape[:-2]
    masks = logits.float().reshape(-1, 1, *logits.shape[-2:])
    masks = F.interpolate(masks, (encoder_size, encoder_size), mode="bilinear", align_corners=False)
    masks = masks[..., :input_size[0], :input_size[1]]
    masks = F.interpolate(masks, tuple(out_size), mode="bilinear", align_corners=False)
    return masks.reshape(*lead, *masks.shape[-2:])


# ------------------------------------------------------------------- loss
def dice_coefficients(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The reference's dice coefficient between every prediction and every mask of an image.

    ``logits`` (B, P, H, W), ``masks`` (B, M, H, W); returns (B, P, M),
    ``(2 |sigmoid(p) * g| + eps) / (|sigmoid(p)| + |g| + eps)``.
    """
    p = logits.flatten(2).sigmoid()
    g = masks.flatten(2).to(p.dtype)
    intersection = p @ g.transpose(1, 2)
    union = p.sum(-1, keepdim=True) + g.sum(-1).unsqueeze(1)
    return (2 * intersection + DICE_EPS) / (union + DICE_EPS)


def match_masks(cost: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Hungarian matching per image: (B, P) index of the reference mask each prediction gets, -1 if none.

    Only the first ``counts[b]`` reference masks of image b are real. scipy runs on the
    CPU: cost and counts cross to the host together, in one transfer per batch.
    """
    b, p, m = cost.shape
    host = torch.cat([cost.detach().float().flatten(), counts.detach().to(cost.device, torch.float32)]).cpu().numpy()
    cost_np, counts_np = host[:b * p * m].reshape(b, p, m), host[b * p * m:]
    assignment = np.full((b, p), -1, dtype=np.int64)
    for i in range(b):
        n = int(min(max(counts_np[i], 0), m))
        if n:
            rows, cols = linear_sum_assignment(cost_np[i, :, :n])
            assignment[i, rows] = cols
    return torch.from_numpy(assignment).to(cost.device)


# the most predictions (or reference masks) whose matching runs on the device: 8! orders of the rows, 40,320
DEVICE_MATCHING_MAX = 8


@functools.cache
def row_orders(n: int, device: torch.device) -> torch.Tensor:
    """Every order of ``n`` rows, (n!, n) int64 on ``device``, made once per size and device."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device)


def match_masks_on_device(cost: torch.Tensor, counts: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`match_masks` without leaving the device (train.sam_matching: device): the cheapest assignment by
    trying every one, summed in float64, so no host read stops the step. At most ``DEVICE_MATCHING_MAX``
    predictions and no more reference masks than predictions. The assignment is scipy's wherever the cheapest
    one is unique; between assignments of exactly equal cost it may pick another (the first in
    :func:`row_orders`). Order k gives reference mask j to prediction ``orders[k, j]``; columns past an image's
    count add nothing, so each image's minimum is over its own injections of masks into predictions.
    ``orders``: :func:`row_orders` of the predictions, made by the caller where this runs compiled (the SAM
    head's buffer): traced by dynamo, the 8! Python tuples took 146 s to compile on a CPU, at every recompile.
    """
    b, p, m = cost.shape
    if p > DEVICE_MATCHING_MAX or m > p:
        raise ValueError(f"device matching takes at most {DEVICE_MATCHING_MAX} predictions and no more reference "
                         f"masks than predictions; got {p} predictions and {m} masks (train.sam_matching: scipy)")
    orders = row_orders(p, cost.device) if orders is None else orders
    columns = torch.arange(p, device=cost.device)
    square = F.pad(cost.detach().double(), (0, p - m))  # (B, P, P): columns past m are never real
    real = columns < counts.to(cost.device).clamp(0, m)[:, None]  # (B, P)
    picked = square[:, orders, columns]  # (B, orders, P): the cost of giving mask j to prediction orders[k, j]
    best = orders[(picked * real[:, None, :]).sum(-1).argmin(-1)]  # (B, P)
    return torch.full((b, p), -1, dtype=torch.long, device=cost.device).scatter(
        1, best, torch.where(real, columns.expand(b, p), -1))


def sam_token_loss(logits: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor,
                   matching: str = "scipy") -> torch.Tensor:
    """The reference's SAM loss: :func:`sam_image_losses` averaged over the batch."""
    return sam_image_losses(logits, masks, counts, matching).mean()


def sam_image_losses(logits: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor,
                     matching: str = "scipy", orders: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's SAM loss of each image, ``(B,)``.

    ``logits`` (B, P, H, W) predicted masks, ``masks`` (B, M, H, W) reference masks of which
    the first ``counts[b]`` are real. Per image: match on 1 - dice; matched predictions
    ``1 - mean dice + mean BCE``; unmatched ones ``0.1 x mean BCE`` to an empty mask (if any);
    no reference mask: 0. ``matching``: ``scipy`` (:func:`match_masks`, the reference's) or ``device``
    (:func:`match_masks_on_device`, with ``orders``).
    """
    logits, masks = logits.float(), masks.float()
    with torch.no_grad():
        cost = 1 - dice_coefficients(logits, masks)
        assignment = match_masks_on_device(cost, counts, orders) if matching == "device" else match_masks(cost, counts)
    matched = assignment >= 0
    target = torch.gather(masks, 1, assignment.clamp(min=0)[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
    target = target * matched[:, :, None, None]  # unmatched -> the empty mask
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)  # (B, P)
    p = logits.flatten(2).sigmoid()
    t = target.flatten(2)
    dice = (2 * (p * t).sum(-1) + DICE_EPS) / (p.sum(-1) + t.sum(-1) + DICE_EPS)  # each prediction with its target
    n_matched = matched.sum(1)
    n_unmatched = matched.shape[1] - n_matched
    per_match = n_matched.clamp(min=1)
    positive = (1 - (dice * matched).sum(1) / per_match) + (bce * matched).sum(1) / per_match
    negative = (bce * ~matched).sum(1) / n_unmatched.clamp(min=1)  # 0 when every prediction is matched
    return torch.where(n_matched > 0, positive + UNMATCHED_WEIGHT * negative, torch.zeros_like(positive))


class SamHead(AnchorHead):
    """Thought tokens -> rotary -> queries -> SAM sparse prompts -> frozen mask decoder -> matched mask loss."""

    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "sam"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        self.matching = "scipy"  # train.sam_matching: where the Hungarian matching runs (see sam_token_loss)
        self.decoder_path = Path(cache.decoders_dir) / SAM_DECODER_FILE
        spec = load_sam_decoder_spec(self.decoder_path)
        d = self.dims
        embed_size = tuple(int(s) for s in spec["image_embedding_size"])
        if int(spec["prompt_embed_dim"]) != d["embed_dim"] or embed_size != (d["embed_h"], d["embed_w"]):
            raise ValueError(
                f"{self.decoder_path}: decoder expects image embeddings {spec['prompt_embed_dim']}x{embed_size} "
                f"but the cache's sam/embedding is {d['embed_dim']}x{(d['embed_h'], d['embed_w'])}")
        input_size = tuple(int(s) for s in spec["input_image_size"])
        if input_size[0] != input_size[1]:
            raise ValueError(f"{self.decoder_path}: input_image_size {input_size} is not square")
        self.encoder_size = input_size[0]  # our SAM views fill the encoder's whole square input
        self.mask_size = (d["mask_h"], d["mask_w"])
        self.attend = ThoughtQueries(self.hidden_size, d["embed_dim"], num_queries=self.num_tokens,
                                     num_heads=NUM_HEADS)
        self.frozen = FrozenDecoder("sam_decoder", lambda device: SamDecoder(spec).to(device).eval())
        # train.sam_matching device: every order of the predictions, a buffer so that compiled code reads it as an
        # input instead of tracing how it is made (not saved: it follows from num_tokens)
        if self.num_tokens <= DEVICE_MATCHING_MAX:
            self.register_buffer("prediction_orders", row_orders(self.num_tokens, torch.device("cpu")).clone(),
                                 persistent=False)
        else:
            self.prediction_orders = None

    @property
    def decoder_files(self) -> list[Path]:
        return [self.decoder_path]

    def prompts(self, thoughts: torch.Tensor) -> torch.Tensor:
        """(B, tokens, prompt_dim): one sparse prompt per query."""
        return self.attend(rotary_embedding(thoughts))

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None, views=None) -> torch.Tensor:
        """Mask logits (B, tokens, mask_h, mask_w), one mask per prompt, fp32."""
        embedding = self.target(targets, "embedding", thoughts.shape[0])
        sam = self.frozen.on(thoughts.device)
        prompts = self.prompts(thoughts)
        if not torch.is_autocast_enabled(thoughts.device.type):
            # the frozen decoder stays fp32 (see FrozenDecoder); without autocast feed it fp32
            prompts = prompts.float()
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        logits = decode_prompts(sam.mask_decoder, embedding.to(prompts.dtype), sam.dense_pe.to(prompts.dtype),
                                dense.to(prompts.dtype), prompts)
        size = (self.encoder_size, self.encoder_size)
        return postprocess_masks(logits, self.encoder_size, size, self.mask_size)

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        b = prediction.shape[0]
        return sam_image_losses(prediction, self.target(targets, "masks", b), self.target(targets, "mask_count", b),
                                self.matching, self.prediction_orders)
