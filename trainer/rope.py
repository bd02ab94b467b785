"""The 3-D rope positions of a training batch, computed on the host where the batch is built.

Given no ``position_ids``, Qwen2.5-VL computes them inside its forward (``get_rope_index``): a Python loop over
the samples that reads each one's token types and image grid back from the GPU, about twenty device syncs per
micro-batch at the start of the forward, each of which stops the host from queueing work ahead of the GPU. The
loader's workers compute the same positions with the same function on the batch's CPU tensors instead, and
trainer.model.vlm_inputs hands them to the model.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel


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
