"""The registry of anchors: one small spec per anchor, read by precompute, shards and trainer.

This is the single place for an anchor's token count, its prompt name and the
target arrays it caches. Concrete per-sample shapes depend on the anchor model
(ViT-L vs ViT-S, input size), so each array declares *named* dimensions; the
precompute phase fixes their sizes per cache and records them in the manifest
(``manifest["anchors"][name]["dims"]``), and :func:`array_shape` resolves them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TargetKind = Literal["float", "mask", "count"]


@dataclass(frozen=True)
class TargetArray:
    name: str
    dims: tuple[str, ...]  # per-sample shape, by dimension name
    kind: TargetKind  # float: codec-compressed; mask: bool, bit-packed on disk; count: int32
    description: str


@dataclass(frozen=True)
class AnchorSpec:
    name: str
    tokens: int  # visual thought tokens for this anchor (the paper's counts)
    thought_name: str  # how prompts name it: "What is the {thought_name} of the image?"
    arrays: tuple[TargetArray, ...]
    description: str

    def array(self, name: str) -> TargetArray:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(f"anchor {self.name!r} has no target array {name!r} (has {[a.name for a in self.arrays]})")


ANCHORS: dict[str, AnchorSpec] = {
    spec.name: spec
    for spec in (
        AnchorSpec(
            "sam", 8, "segmentation",
            (
                TargetArray("embedding", ("embed_dim", "embed_h", "embed_w"), "float", "SAM image embedding"),
                TargetArray("masks", ("max_masks", "mask_h", "mask_w"), "mask",
                            "reference masks from automatic mask generation, best first"),
                TargetArray("mask_count", (), "count", "how many of the masks are real"),
            ),
            "Segment Anything (segment-anything)",
        ),
        AnchorSpec(
            "depth", 4, "depth map",
            (
                TargetArray("features", ("layers", "patches", "dim"), "float",
                            "patch features of the 4 backbone layers the DPT head reads"),
                TargetArray("depth", ("map_h", "map_w"), "float",
                            "raw relative depth (disparity, ReLU'd DPT output), not normalised"),
            ),
            "Depth Anything V2",
        ),
        AnchorSpec(
            "dino", 4, "perception feature",
            (TargetArray("features", ("tokens", "dim"), "float", "final-norm tokens, CLS first then patches"),),
            "DINOv2",
        ),
        AnchorSpec(
            "pidinet", 4, "edge map",
            (TargetArray("edges", ("map_h", "map_w"), "float",
                         "sigmoid of PIDINet's side output 1 (the stage-1 branch)"),),
            "PIDINet (table5_baseline)",
        ),
        AnchorSpec(
            "siglip", 4, "clip feature",
            (TargetArray("embedding", ("dim",), "float", "pooled image embedding"),),
            "SigLIP",
        ),
        AnchorSpec(
            "metaclip", 4, "metaclip feature",
            (TargetArray("embedding", ("dim",), "float", "projected image embedding"),),
            "MetaCLIP",
        ),
    )
}


def get_anchor(name: str) -> AnchorSpec:
    try:
        return ANCHORS[name]
    except KeyError:
        raise KeyError(f"unknown anchor {name!r} (known: {list(ANCHORS)})") from None


def array_shape(anchor: str, array: str, dims: dict[str, int]) -> tuple[int, ...]:
    """Per-sample shape of ``anchor/array`` given the dimension sizes a cache recorded."""
    spec = get_anchor(anchor).array(array)
    missing = [d for d in spec.dims if d not in dims]
    if missing:
        raise KeyError(f"{anchor}/{array}: dimension sizes missing for {missing}")
    return tuple(int(dims[d]) for d in spec.dims)


# ------------------------------------------------------------------ files the two phases exchange
# Precompute writes these into the cache's decoders folder (shards.layout.DECODERS_DIR); the trainer's
# heads read them back. Both sides name them from here only.

#: SAM's frozen prompt encoder + mask decoder: a torch.save'd dict of the constructor arguments and the two
#: state dicts, enough to rebuild both with segment_anything's own classes without the SAM checkpoint.
SAM_DECODER_FILE = "sam_decoder.pt"
SAM_DECODER_KEYS = ("prompt_embed_dim", "image_embedding_size", "input_image_size", "mask_in_chans", "transformer",
                    "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim", "prompt_encoder",
                    "mask_decoder")

#: PIDINet's first stage as a torch.export program (float RGB in [0, 1] normalised by mean/std -> (B, C, S, S)
#: features, dynamic batch, fixed S) and its JSON description, whose keys the trainer needs listed below.
PIDINET_STAGE1_PROGRAM = "pidinet_stage1.pt2"
PIDINET_STAGE1_META = "pidinet_stage1.json"
PIDINET_STAGE1_META_KEYS = ("input_size", "channels", "mean", "std")
