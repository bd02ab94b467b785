"""PIDINet head (the reference's): the 4 attention outputs are 1x1 kernels over PIDINet's stage-1 features x1.

Front end: :class:`~trainer.heads.attention.ThoughtQueries` (4 queries, 4 heads, width =
x1's channels, 60 for PIDINet). Each of the 4 outputs is a bias-free 1x1 convolution
kernel over x1; the 4 maps are averaged and passed through a sigmoid
(covt_qwen2_5_vl.py 808-825). Loss: L1 to the cached target, sigmoid(side output 1)
of PIDINet (372-378, 1749). If the cached map's size differs from x1's (not in the
reference, where both are 256), the probability map is resized bilinearly to it.

x1 is recomputed, not cached: precompute exports the first stage as
``decoders/pidinet_stage1.pt2`` (a ``torch.export`` program: float RGB in [0, 1]
normalised by the json's mean/std -> (B, C, S, S) features) and
``decoders/pidinet_stage1.json`` ({"input_size", "channels", "mean", "std"}). The head
asks for square views of ``input_size`` (``view_size``) and runs the stage under
no_grad in fp32 (the features are constants).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.export.passes import move_to_device_pass

from covt.anchors import PIDINET_STAGE1_META, PIDINET_STAGE1_META_KEYS, PIDINET_STAGE1_PROGRAM
from covt.untrusted import load_exported_program

from .attention import ThoughtQueries
from .base import AnchorHead, DimsSource, FrozenDecoder, missing_decoder_error, resize_maps

NUM_HEADS = 4


class PidinetHead(AnchorHead):
    def __init__(self, hidden_size: int, cache: DimsSource, anchor: str = "pidinet"):
        super().__init__(anchor, hidden_size, cache.dims(anchor))
        decoders = Path(cache.decoders_dir)
        self.program_path, self.meta_path = decoders / PIDINET_STAGE1_PROGRAM, decoders / PIDINET_STAGE1_META
        for path in (self.program_path, self.meta_path):
            if not path.is_file():
                raise missing_decoder_error(anchor, path)
        meta = json.loads(self.meta_path.read_text())
        missing = [k for k in PIDINET_STAGE1_META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{self.meta_path}: missing keys {missing}")
        self.view_size = int(meta["input_size"])
        self.channels = int(meta["channels"])
        # plain floats, not buffers: a bf16 cast of the module must not round the normalisation
        self.mean = tuple(float(v) for v in meta["mean"])
        self.std = tuple(float(v) for v in meta["std"])
        self.normalisations: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.map_size = (self.dims["map_h"], self.dims["map_w"])
        program = load_exported_program(self.program_path)  # refuses an archive that would unpickle
        self.frozen = FrozenDecoder("pidinet_stage1", lambda device: move_to_device_pass(program, device).module())
        self.attend = ThoughtQueries(self.hidden_size, self.channels, num_queries=self.num_tokens,
                                     num_heads=NUM_HEADS)

    @property
    def decoder_files(self) -> list[Path]:
        return [self.program_path, self.meta_path]

    @torch.no_grad()
    def stage1_features(self, views: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) first-stage features x1 of uint8 (B, 3, S, S) views."""
        if views is None:
            raise ValueError(f"{self.anchor} head needs uint8 views of size {self.view_size}, got None")
        if views.dim() != 4 or tuple(views.shape[1:]) != (3, self.view_size, self.view_size):
            raise ValueError(f"{self.anchor} head: views must be (B, 3, {self.view_size}, {self.view_size}) uint8, "
                             f"got {tuple(views.shape)} {views.dtype}")
        mean, std = self.normalisation(views.device)
        x = (views.float() / 255.0 - mean) / std
        with torch.autocast(views.device.type, enabled=False):  # constants: compute them in fp32
            features = self.frozen.on(views.device)(x)
        if features.shape[1] != self.channels:
            raise ValueError(f"{self.program_path}: stage gives {features.shape[1]} channels, "
                             f"{self.meta_path} says {self.channels}")
        return features

    def build_on(self, device: torch.device) -> None:
        """Also the views' normalisation (compiled, its first use would add a variant)."""
        super().build_on(device)
        self.normalisation(device)

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The views' mean and std, (1, 3, 1, 1) fp32 on ``device``, made once per device: a copy from host memory
        at every forward would make the host wait for the GPU there (and stop a CUDA graph's capture)."""
        if device not in self.normalisations:
            self.normalisations[device] = tuple(torch.tensor(values, device=device).view(1, -1, 1, 1)
                                                for values in (self.mean, self.std))
        return self.normalisations[device]

    def decode(self, thoughts: torch.Tensor, targets: dict | None = None,
               views: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted edge probability (B, map_h, map_w)."""
        return self.edges_from_features(thoughts, self.stage1_features(views))

    def edges_from_features(self, thoughts: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Edge probability (B, map_h, map_w) from the thoughts and stage-1 features x1 (B, C, S, S)."""
        kernels = self.attend(thoughts)  # (B, tokens, C): one 1x1 kernel per token
        with torch.autocast(thoughts.device.type, enabled=False):  # the reference convolves in fp32
            maps = torch.einsum("bkc,bchw->bkhw", kernels.float(), x1.float())
        edges = torch.sigmoid(maps.mean(1, keepdim=True))
        return resize_maps(edges, self.map_size)[:, 0]

    def row_losses(self, prediction: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        edges = self.target(targets, "edges", prediction.shape[0])
        return self.row_means((prediction - edges.float()).abs())
