"""PIDINet head: each thought token is a 1x1 kernel over PIDINet's frozen first-stage features.

Precompute exports the first stage as ``decoders/pidinet_stage1.pt2`` (a
``torch.export`` program: float RGB in [0, 1] normalised by the json's
mean/std -> (B, C, S, S) features) and ``decoders/pidinet_stage1.json``
({"input_size", "channels", "mean", "std"}). The head asks for square views of
``input_size`` (``view_size``), runs the stage under no_grad (the features are
constants), applies each token's kernel (C weights + a bias, a 1x1 conv) to
get 4 maps, averages them, applies a sigmoid and resizes to the cached edge
map; L1 to the cached edges.

Normalisation that keeps it trainable: each feature channel is standardised
per image (instance norm without parameters) and the kernel response divided
by sqrt(C), so the kernels see unit-scale inputs whatever the stage's
activation scale.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.export.passes import move_to_device_pass

from .base import AnchorHead, DimsSource, FrozenDecoder, TokenProjection, missing_decoder_error, resize_maps

PROGRAM_FILE = "pidinet_stage1.pt2"
META_FILE = "pidinet_stage1.json"


class PidinetHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "pidinet"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        decoders = Path(cache.decoders_dir)
        self.program_path, self.meta_path = decoders / PROGRAM_FILE, decoders / META_FILE
        for path in (self.program_path, self.meta_path):
            if not path.is_file():
                raise missing_decoder_error(anchor, path)
        meta = json.loads(self.meta_path.read_text())
        missing = [k for k in ("input_size", "channels", "mean", "std") if k not in meta]
        if missing:
            raise ValueError(f"{self.meta_path}: missing keys {missing}")
        self.view_size = int(meta["input_size"])
        self.channels = int(meta["channels"])
        # plain floats, not buffers: a bf16 cast of the module must not round the normalisation
        self.mean = tuple(float(v) for v in meta["mean"])
        self.std = tuple(float(v) for v in meta["std"])
        self.map_size = (self.dims["map_h"], self.dims["map_w"])
        program = torch.export.load(str(self.program_path))
        self.frozen = FrozenDecoder("pidinet_stage1", lambda device: move_to_device_pass(program, device).module())
        self.project = TokenProjection(self.hidden_size, self.channels + 1)  # 1x1 kernel + its bias

    @property
    def decoder_files(self) -> list[Path]:
        return [self.program_path, self.meta_path]

    @torch.no_grad()
    def stage1_features(self, views: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) standardised first-stage features of uint8 (B, 3, S, S) views."""
        if views is None:
            raise ValueError(f"{self.anchor} head needs uint8 views of size {self.view_size}, got None")
        if views.dim() != 4 or tuple(views.shape[1:]) != (3, self.view_size, self.view_size):
            raise ValueError(f"{self.anchor} head: views must be (B, 3, {self.view_size}, {self.view_size}) uint8, "
                             f"got {tuple(views.shape)} {views.dtype}")
        mean = torch.tensor(self.mean, device=views.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=views.device).view(1, -1, 1, 1)
        x = (views.float() / 255.0 - mean) / std
        with torch.autocast(views.device.type, enabled=False):  # constants: compute them in fp32
            features = self.frozen.on(views.device)(x)
        if features.shape[1] != self.channels:
            raise ValueError(f"{self.program_path}: stage gives {features.shape[1]} channels, "
                             f"{self.meta_path} says {self.channels}")
        return F.instance_norm(features)

    def decode(self, thoughts: torch.Tensor, targets: Optional[dict] = None,
               views: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted edge probability (B, map_h, map_w)."""
        features = self.stage1_features(views)
        kernels = self.project(thoughts)  # (B, tokens, C + 1)
        weight, bias = kernels[..., :-1], kernels[..., -1]
        maps = torch.einsum("bkc,bchw->bkhw", weight, features.to(weight.dtype)) / math.sqrt(self.channels)
        maps = (maps + bias[..., None, None]).mean(1, keepdim=True)
        return resize_maps(torch.sigmoid(maps.float()), self.map_size)[:, 0]

    def loss(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        edges = self.target(targets, "edges", prediction.shape[0])
        return F.l1_loss(prediction, edges.float())
