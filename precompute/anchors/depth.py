"""Depth Anything V2: DINOv2 encoder + DPT head, from ``depth_anything_v2_vit{s,b,l,g}.pth``.

Targets per image, from the square view at the variant's input size (518 for
the real variants), normalised with ImageNet mean/std:
  - ``features``: patch tokens (after the backbone norm) of the 4 blocks the DPT
    head reads (ViT-L: 4, 11, 17, 23), ``(4, (S/14)^2, D)``;
  - ``depth``: the raw relative depth (disparity: the DPT head's output after its
    ReLU, at S x S), resized bilinearly with align_corners=True to the variant's map
    size (256 for the real variants), not normalised: the reference's target
    (covt_qwen2_5_vl.py ``get_depth_features_and_gt``), which its L1 x 0.005 is tuned to.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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

WHERE_TO_GET = ("https://huggingface.co/depth-anything/Depth-Anything-V2-Large "
                "(depth_anything_v2_vitl.pth; -Small/-Base for vits/vitb)")


# -------------------------------------------------------------------- DPT head
class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Adds the refined skip (if any) to the coarser path, refines, upsamples, projects."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)  # refines the skip input
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        if size is None:
            path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            path = F.interpolate(path, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(path)


class Scratch(nn.Module):
    def __init__(self, out_channels: tuple[int, ...], features: int):
        super().__init__()
        for i, c in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU()
        )


class DPTHead(nn.Module):
    def __init__(self, in_dim: int, features: int, out_channels: tuple[int, ...]):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(in_dim, c, 1) for c in out_channels)
        c = out_channels
        # x4 up, x2 up, same, x2 down: a 4-level pyramid from the single-scale ViT grid
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], 4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], 3, stride=2, padding=1),
        ])
        self.scratch = Scratch(out_channels, features)

    def forward(self, patch_tokens: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        levels = []
        for i, tokens in enumerate(patch_tokens):
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], rows, cols)
            levels.append(self.resize_layers[i](self.projects[i](x)))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i + 1}_rn")(x) for i, x in enumerate(levels))
        path = s.refinenet4(l4, size=l3.shape[2:])
        path = s.refinenet3(path, l3, size=l2.shape[2:])
        path = s.refinenet2(path, l2, size=l1.shape[2:])
        path = s.refinenet1(path, l1)
        out = s.output_conv1(path)
        out = F.interpolate(out, (rows * PATCH_SIZE, cols * PATCH_SIZE), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    def __init__(self, variant: ViTVariant, num_register_tokens: int = 0):
        super().__init__()
        self.variant = variant
        self.pretrained = DinoVisionTransformer(variant, num_register_tokens)
        self.depth_head = DPTHead(variant.embed_dim, variant.dpt_features, variant.dpt_out_channels)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``x`` normalised ``(B, 3, H, W)`` -> (normed tokens of the 4 DPT layers, each
        ``(B, T, D)`` with CLS/registers first; relative depth ``(B, H, W)``)."""
        rows, cols = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        layers = self.pretrained.forward_layers(x, self.variant.depth_layers)
        skip = self.pretrained.num_prefix_tokens
        depth = self.depth_head([t[:, skip:] for t in layers], rows, cols)
        return layers, F.relu(depth).squeeze(1)


# ---------------------------------------------------------------------- anchor
class DepthAnchor(AnchorModel):
    name = "depth"

    def __init__(self, model: DepthAnythingV2, ckpt_path: str, dtype: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.variant = model.variant
        self.input_size = self.variant.depth_input_size
        self.map_size = self.variant.depth_map_size
        self.ckpt_path = ckpt_path
        self.dtype = dtype

    def dims(self) -> dict[str, int]:
        patches = (self.input_size // PATCH_SIZE) ** 2
        return {"layers": 4, "patches": patches, "dim": self.variant.embed_dim,
                "map_h": self.map_size, "map_w": self.map_size}

    @torch.inference_mode()
    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        x = prepare_views(views, self.model, self.input_size, self.name)
        with autocast(x.device, self.dtype == "bf16"):
            layers, depth = self.model(x)
        skip = self.model.pretrained.num_prefix_tokens
        features = torch.stack([t[:, skip:] for t in layers], dim=1).float()
        depth = F.interpolate(depth.float()[:, None], (self.map_size, self.map_size),
                              mode="bilinear", align_corners=True)[:, 0]
        return to_host({"features": features, "depth": depth})

    def fingerprint(self) -> dict:
        return {
            **self.checkpoint_fields(self.ckpt_path),
            "variant": self.variant.name,
            "input_size": self.input_size,
            "layers": list(self.variant.depth_layers),
            "preprocessing": (f"square view {self.input_size}x{self.input_size} RGB /255, "
                              f"normalised mean {IMAGENET_MEAN} std {IMAGENET_STD}; depth = ReLU'd DPT "
                              f"output resized bilinear (align_corners=True) to {self.map_size}x{self.map_size}, "
                              "raw (not normalised)"),
            "dtype": self.dtype,
            "torch": torch.__version__,
        }


def write_random_checkpoint(path: str | Path, variant: ViTVariant, seed: int) -> None:
    """A seeded random-weight Depth Anything V2 file in the released layout."""
    model = randomize_(DepthAnythingV2(variant), seed)
    # The head ends in ReLU: with random signs the map is often all zeros. A non-negative
    # last 1x1 conv over its ReLU'd input keeps the random depth positive and varying.
    last = model.depth_head.scratch.output_conv2[2]
    with torch.no_grad():
        last.weight.abs_()
        last.bias.fill_(0.1)
    with atomic_file(path) as tmp:
        torch.save(model.state_dict(), tmp)


def build_depth_model(state_dict: dict[str, torch.Tensor], source: str | Path,
                      variant_name: str = "") -> DepthAnythingV2:
    key = "pretrained.cls_token"
    if key not in state_dict:
        raise ValueError(f"{source}: not a Depth Anything V2 checkpoint (no {key}; "
                         f"first keys: {list(state_dict)[:5]})")
    embed_dim = int(state_dict[key].shape[-1])
    variant = resolve_variant(variant_name, embed_dim, source, "depth")
    model = DepthAnythingV2(variant, infer_register_tokens(state_dict, "pretrained."))
    load_strict(model, {k: v.float() for k, v in state_dict.items()}, source)
    return model


def load_depth(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> DepthAnchor:
    path = checkpoint_file("depth", ckpt, WHERE_TO_GET, lambda p, seed: write_random_checkpoint(
        p, get_variant(ckpt.variant or "vit_tiny"), seed))
    model = build_depth_model(read_checkpoint(path), path, ckpt.variant)
    return DepthAnchor(model.to(device), str(path), pre.dtype)
