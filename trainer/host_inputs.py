"""What the model would compute from a batch's ids and image grids, computed on the host where the batch is built.

Given only ids and grids, Qwen2.5-VL works out at the start of every forward the 3-D rope positions of the text
(``get_rope_index``, a Python loop over the samples) and its vision tower's rotary positions, window order and
attention segments (``transformers.vision_utils``): about thirty reads from the GPU per micro-batch, each of which
stops the host from queueing work ahead of it. The loader's workers compute the same tensors with the same
functions on the batch's CPU tensors, and trainer.model.vlm_inputs hands them to the model through the inputs
transformers provides for them (``position_ids``; ``image_*``, which reach the vision tower only; and for a
packed row the varlen keywords, which reach the language model's attention only). The positions of the image
tokens (:func:`image_token_index`) let trainer.model write the image features into the embeddings without the
count transformers reads back to check them.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index


class HostRopeIndex:
    """transformers' own ``Qwen2_5_VLModel.get_rope_index``, without the model: of the model it reads only
    ``config.vision_config`` (the spatial merge size; ``tokens_per_second`` spaces video frames, and a training
    sample holds images only) and its own ``get_vision_position_ids``."""

    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    def __init__(self, spatial_merge_size: int):
        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=spatial_merge_size,
                                                                    tokens_per_second=None))


def padded_position_ids(batch: dict, spatial_merge_size: int) -> torch.Tensor:
    """``(3, B, T)``: what the model computes for a right-padded batch (0 at padding)."""
    rope = HostRopeIndex(spatial_merge_size)
    return rope.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                               attention_mask=batch["attention_mask"])[0]


def packed_position_ids(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``(4, 1, T)`` positions of the padded batch's samples packed into one row (``keep``: its attention mask, as
    bools), transformers' packed layout for Qwen2.5-VL: row 0 the text positions, 0.. within each sample, from which
    the attention finds the sample boundaries (masking_utils; trainer.text_attention); rows 1-3 each sample's own
    rope positions, those of the padded batch."""
    text = torch.cat([torch.arange(int(n)) for n in keep.sum(1)])
    return torch.cat([text[None, None], padded[:, keep][:, None]])


IMAGE_TOKEN = 1  # an image token's mm_token_type_ids


def image_token_index(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Flat positions (over the batch's rows x tokens) of its image tokens, in order: where trainer.model writes
    the images' features, in the order the vision tower gives them."""
    return (mm_token_type_ids.reshape(-1) == IMAGE_TOKEN).nonzero().flatten()


def image_feature_count(grid_thw: torch.Tensor, spatial_merge_size: int) -> int:
    """How many features (merged patches) the vision tower gives for images of ``grid_thw``."""
    return int(grid_thw.prod(-1).sum()) // spatial_merge_size**2


def longest_segment(cu_seqlens: torch.Tensor) -> int:
    """The longest segment of cumulative boundaries ``cu_seqlens`` (a varlen kernel's max_seqlen)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_text_boundaries(lengths: torch.Tensor) -> dict:
    """The varlen keywords of a packed row's samples (``lengths``: their token counts): int32 cu_seqlens and the
    longest sample, read by trainer.text_attention in every decoder layer without a look at the device."""
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    most = int(lengths.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": most, "max_length_k": most}


@dataclass(frozen=True)
class VisionGeometry:
    """The vision tower's settings its index tensors follow from (trainer.model.CoVTModel.vision_geometry)."""

    spatial_merge_size: int
    window_size: int
    patch_size: int


def vision_inputs(grid_thw: torch.Tensor, geometry: VisionGeometry) -> dict:
    """The vision tower's rotary positions, window order and attention segments of images of ``grid_thw``, by
    transformers' own functions, as the ``image_*`` inputs of the model's forward."""
    cu = get_vision_cu_seqlens(grid_thw)
    window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=geometry.spatial_merge_size,
                                                      window_size=geometry.window_size,
                                                      patch_size=geometry.patch_size)
    return {"image_position_ids": get_vision_position_ids(grid_thw, geometry.spatial_merge_size),
            "image_cu_seqlens": cu, "image_max_seqlen": longest_segment(cu), "image_window_index": window_index,
            "image_cu_window_seqlens": cu_window, "image_max_window_seqlen": longest_segment(cu_window)}


# every key build_batch adds for the model to skip its own computation (position_ids: padded batches only; a packed
# row needs its text positions to find its samples)
HOST_INPUT_KEYS = ("image_token_index", "has_padding", "image_position_ids", "image_cu_seqlens",
                   "image_max_seqlen", "image_window_index", "image_cu_window_seqlens", "image_max_window_seqlen",
                   "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def without_host_inputs(batch: dict) -> dict:
    """``batch`` as the model gets it without this module: it computes the rope positions (of a padded batch),
    the vision tower's indices, the image tokens' places, whether to mask padding and a packed row's boundaries
    itself, reading the GPU."""
    bare = {k: v for k, v in batch.items() if k not in HOST_INPUT_KEYS}
    if "packed" not in batch:
        bare.pop("position_ids", None)
    return bare
