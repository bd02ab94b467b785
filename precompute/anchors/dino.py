"""DINOv2 final-norm tokens, from ``dinov2_vit{s,b,l,g}14_pretrain.pth`` or a Hugging Face folder.

Target per image, from the square view at the variant's DINO input size (448 for
the real variants; the 37x37 position grid of the 518 pretraining is resized
as the original does), normalised with ImageNet mean/std: ``features`` = the
final-norm tokens, CLS first then the (S/14)^2 patches, ``(1 + N, D)``
(register tokens, if the model has them, are dropped).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from covt.compute import autocast
from covt.config import CheckpointConfig, PrecomputeConfig
from covt.fs import atomic_file
from precompute.anchors.base import AnchorModel, checkpoint_file, to_host
from precompute.anchors.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_SIZE,
    DinoVisionTransformer,
    ViTVariant,
    get_variant,
    infer_register_tokens,
    load_strict,
    prepare_views,
    randomize_,
    read_checkpoint,
    resolve_variant,
)

WHERE_TO_GET = ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth "
                "(or a Hugging Face Dinov2Model folder such as facebook/dinov2-large)")


class HubDino(nn.Module):
    """Our ViT loaded from the torch.hub-format file: ``(B,3,S,S)`` -> ``(B, 1+N, D)``."""

    def __init__(self, vit: DinoVisionTransformer):
        super().__init__()
        self.vit = vit
        self.embed_dim = vit.variant.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)
        return torch.cat([tokens[:, :1], tokens[:, self.vit.num_prefix_tokens:]], dim=1)


class HuggingFaceDino(nn.Module):
    """A transformers ``Dinov2Model`` (or with registers) folder: last_hidden_state is final-norm'ed."""

    def __init__(self, folder: Path):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        cfg = self.model.config
        if not cfg.model_type.startswith("dinov2"):
            raise ValueError(f"{folder}: model_type {cfg.model_type!r} is not a DINOv2 model")
        if cfg.patch_size != PATCH_SIZE:
            raise ValueError(f"{folder}: patch_size {cfg.patch_size}, expected {PATCH_SIZE}")
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.embed_dim = cfg.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=x).last_hidden_state
        return torch.cat([tokens[:, :1], tokens[:, 1 + self.num_register_tokens:]], dim=1)


class DinoAnchor(AnchorModel):
    name = "dino"

    def __init__(self, model: nn.Module, input_size: int, variant: str, ckpt_path: str, dtype: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.input_size = input_size
        self.variant = variant
        self.ckpt_path = ckpt_path
        self.dtype = dtype

    def dims(self) -> dict[str, int]:
        return {"tokens": 1 + (self.input_size // PATCH_SIZE) ** 2, "dim": self.model.embed_dim}

    @torch.inference_mode()
    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        x = prepare_views(views, self.model, self.input_size, self.name)
        with autocast(x.device, self.dtype == "bf16"):
            tokens = self.model(x)
        return to_host({"features": tokens.float()})

    def fingerprint(self) -> dict:
        return {
            **self.checkpoint_fields(self.ckpt_path),
            "format": type(self.model).__name__,
            "variant": self.variant,
            "input_size": self.input_size,
            "preprocessing": (f"square view {self.input_size}x{self.input_size} RGB /255, normalised mean "
                              f"{IMAGENET_MEAN} std {IMAGENET_STD}; final-norm tokens, CLS then patches"),
            "dtype": self.dtype,
            "torch": torch.__version__,
        }


def write_random_checkpoint(path: str | Path, variant: ViTVariant, seed: int) -> None:
    """A seeded random-weight DINOv2 file in the torch.hub layout."""
    with atomic_file(path) as tmp:
        torch.save(randomize_(DinoVisionTransformer(variant), seed).state_dict(), tmp)


def build_hub_dino(state_dict: dict[str, torch.Tensor], source: str | Path, variant_name: str = "") -> HubDino:
    if "cls_token" not in state_dict:
        hint = " (a Depth Anything file? use it as the depth anchor)" if "pretrained.cls_token" in state_dict else ""
        raise ValueError(f"{source}: not a DINOv2 torch.hub checkpoint (no cls_token){hint}; "
                         f"first keys: {list(state_dict)[:5]}")
    embed_dim = int(state_dict["cls_token"].shape[-1])
    variant = resolve_variant(variant_name, embed_dim, source, "dino")
    vit = DinoVisionTransformer(variant, infer_register_tokens(state_dict))
    load_strict(vit, {k: v.float() for k, v in state_dict.items()}, source)
    return HubDino(vit)


def load_dino(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> DinoAnchor:
    path = Path(ckpt.path)
    if path.is_dir():
        model = HuggingFaceDino(path)
        variant = resolve_variant(ckpt.variant, model.embed_dim, path, "dino")
        return DinoAnchor(model.to(device), variant.dino_input_size, variant.name, str(path), pre.dtype)
    checkpoint_file("dino", ckpt, WHERE_TO_GET, lambda p, seed: write_random_checkpoint(
        p, get_variant(ckpt.variant or "vit_tiny"), seed))
    model = build_hub_dino(read_checkpoint(path), path, ckpt.variant)
    variant = model.vit.variant
    return DinoAnchor(model.to(device), variant.dino_input_size, variant.name, str(path), pre.dtype)
