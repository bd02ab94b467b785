"""PIDINet edges (Su et al. 2021), from the official ``table5_baseline.pth`` and its kin.

Target per image, from the 256x256 square view, ``/255`` then ImageNet
mean/std: ``edges`` = sigmoid(side output 1) at 256x256, the edge map of the first
stage's branch, which is the reference's target (CoVT's PIDINet returns ``e1`` and
trains on its sigmoid), not the fused output. The network runs in
fp32 (it is small). ``export_decoders`` writes the first stage (init block +
stage-1 blocks, 60 channels at full resolution) with ``torch.export``: the
trainer's PIDINet head recomputes those features instead of caching 60x256x256
floats per image.

The checkpoint cannot say which pixel-difference convolution each layer was
trained with, so the ``variant`` names the configuration (``baseline`` for
``table5_baseline.pth``: all vanilla; ``carv4`` etc. for the other released
models). Widths and the attention / dilation modules are read from the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covt.anchors import PIDINET_STAGE1_META, PIDINET_STAGE1_PROGRAM
from covt.config import CheckpointConfig, PrecomputeConfig
from covt.fs import atomic_file, atomic_save
from precompute.anchors.base import AnchorModel, checkpoint_file, to_host
from precompute.anchors.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_strict,
    prepare_views,
    read_checkpoint,
)

WHERE_TO_GET = "https://github.com/hellozhuo/pidinet/tree/master/trained_models (table5_baseline.pth)"
INPUT_SIZE = 256
NUM_LAYERS = 16  # init block + 3 + 4 + 4 + 4 blocks

# ----------------------------------------------------- pixel-difference convolutions
PDC_KINDS = ("cv", "cd", "ad", "rd")  # vanilla, central, angular, radial difference


def _repeat(pattern: list[str], times: int) -> tuple[str, ...]:
    return tuple(pattern * times)


#: configuration name -> kind of each of the 16 layers (init block first), as the paper's tables name them
CONFIGS: dict[str, tuple[str, ...]] = {
    "baseline": _repeat(["cv"], 16),
    "c-v15": ("cd",) + _repeat(["cv"], 15),
    "a-v15": ("ad",) + _repeat(["cv"], 15),
    "r-v15": ("rd",) + _repeat(["cv"], 15),
    "cvvv4": _repeat(["cd", "cv", "cv", "cv"], 4),
    "avvv4": _repeat(["ad", "cv", "cv", "cv"], 4),
    "rvvv4": _repeat(["rd", "cv", "cv", "cv"], 4),
    "cccv4": _repeat(["cd", "cd", "cd", "cv"], 4),
    "aaav4": _repeat(["ad", "ad", "ad", "cv"], 4),
    "rrrv4": _repeat(["rd", "rd", "rd", "cv"], 4),
    "c16": _repeat(["cd"], 16),
    "a16": _repeat(["ad"], 16),
    "r16": _repeat(["rd"], 16),
    "carv4": _repeat(["cd", "ad", "rd", "cv"], 4),
}

# Angular difference: each 3x3 tap minus its clockwise neighbour on the ring
# 0 1 2 / 3 4 5 / 6 7 8 (the centre pairs with itself). As a kernel, tap j gets
# w_j - w_{ANGULAR_PARTNER[j]}.
ANGULAR_PARTNER = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# Radial difference on a 5x5 footprint: weights w_1..w_8 (w_0 is unused, as in the
# original) go in order to the 8 directions (row-major); each pairs the outer-ring tap
# (+w) with the inner-ring tap on the same ray (-w).
RADIAL_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
RADIAL_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


def vanilla_kernel(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The plain convolution kernel equal to pixel-difference convolution ``kind`` with 3x3 ``weight``.

    ``cd``: sum_i w_i (x_i - x_centre), i.e. the centre tap loses sum(w).
    ``ad``: sum_i w_i (x_i - x_clockwise(i)).  ``rd``: sum_i w_i (x_outer(i) - x_inner(i)), 5x5.
    """
    out_c, in_c = weight.shape[:2]
    w = weight.reshape(out_c, in_c, 9)
    if kind == "cv":
        return weight
    if kind == "cd":
        k = w.clone()
        k[:, :, 4] = w[:, :, 4] - w.sum(dim=2)
        return k.view_as(weight)
    if kind == "ad":
        return (w - w[:, :, list(ANGULAR_PARTNER)]).view_as(weight)
    if kind == "rd":
        k = w.new_zeros(out_c, in_c, 25)
        k[:, :, list(RADIAL_OUTER)] = w[:, :, 1:]
        k[:, :, list(RADIAL_INNER)] = -w[:, :, 1:]
        return k.view(out_c, in_c, 5, 5)
    raise ValueError(f"unknown pixel-difference convolution {kind!r} (known: {PDC_KINDS})")


class PixelDifferenceConv2d(nn.Module):
    """A 3x3 convolution whose weights act on pixel differences; stored as the 3x3 ``weight``
    the checkpoints hold, run as the equivalent vanilla kernel (5x5 for ``rd``)."""

    def __init__(self, kind: str, in_c: int, out_c: int, padding: int = 1, groups: int = 1):
        super().__init__()
        if kind not in PDC_KINDS:
            raise ValueError(f"unknown pixel-difference convolution {kind!r} (known: {PDC_KINDS})")
        self.kind, self.padding, self.groups = kind, padding, groups
        self.weight = nn.Parameter(torch.empty(out_c, in_c // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rd spreads the 3x3 taps over a 5x5 footprint, so it pads twice as much
        pad = 2 * self.padding if self.kind == "rd" else self.padding
        return F.conv2d(x, vanilla_kernel(self.weight, self.kind), padding=pad, groups=self.groups)


# ------------------------------------------------------------------------- network
class PDCBlock(nn.Module):
    """Depthwise pixel-difference conv -> ReLU -> pointwise conv, residual; stride 2 max-pools first."""

    def __init__(self, kind: str, in_c: int, out_c: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(in_c, out_c, 1)
        self.conv1 = PixelDifferenceConv2d(kind, in_c, in_c, padding=1, groups=in_c)
        self.conv2 = nn.Conv2d(in_c, out_c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: 1x1 reduce, then four dilated 3x3 convs summed."""

    def __init__(self, in_c: int, out_c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 1)
        for i, d in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{i}", nn.Conv2d(out_c, out_c, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: a one-channel sigmoid gate computed from the features."""

    def __init__(self, channels: int, mid: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, 1)
        self.conv2 = nn.Conv2d(mid, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """``forward`` -> [side1, side2, side3, side4, fused], sigmoid probabilities at input size."""

    def __init__(self, kinds: tuple[str, ...], width: int = 60, dil: int | None = 24, sa: bool = True):
        super().__init__()
        if len(kinds) != NUM_LAYERS:
            raise ValueError(f"PIDINet needs {NUM_LAYERS} layer kinds, got {len(kinds)}")
        self.kinds, self.sa, self.dil = tuple(kinds), sa, dil
        c = width
        self.init_block = PixelDifferenceConv2d(kinds[0], 3, c, padding=1)
        stages = [(c, c, 3), (c, 2 * c, 4), (2 * c, 4 * c, 4), (4 * c, 4 * c, 4)]
        layer = 1
        for s, (in_c, out_c, n) in enumerate(stages, start=1):
            for b in range(1, n + 1):
                stride = 2 if (b == 1 and s > 1) else 1
                setattr(self, f"block{s}_{b}", PDCBlock(kinds[layer], in_c if b == 1 else out_c, out_c, stride))
                layer += 1
        self.num_blocks = [n for *_, n in stages]
        fuse = [c, 2 * c, 4 * c, 4 * c]
        if dil is not None:
            self.dilations = nn.ModuleList(CDCM(f, dil) for f in fuse)
        if sa:
            self.attentions = nn.ModuleList(CSAM(dil if dil is not None else f) for f in fuse)
        self.conv_reduces = nn.ModuleList(MapReduce(dil if dil is not None else f) for f in fuse)
        self.classifier = nn.Conv2d(4, 1, 1)

    def stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        for b in range(1, self.num_blocks[s - 1] + 1):
            x = getattr(self, f"block{s}_{b}")(x)
        return x

    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        """First-stage features ``(B, width, H, W)`` of a normalised ``(B, 3, H, W)`` input."""
        return self.stage(1, self.init_block(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        feats = [self.stage1(x)]
        for s in (2, 3, 4):
            feats.append(self.stage(s, feats[-1]))
        sides = []
        for i, f in enumerate(feats):
            if self.dil is not None:
                f = self.dilations[i](f)
            if self.sa:
                f = self.attentions[i](f)
            e = self.conv_reduces[i](f)
            sides.append(F.interpolate(e, (h, w), mode="bilinear", align_corners=False))
        fused = self.classifier(torch.cat(sides, dim=1))
        return [torch.sigmoid(t) for t in sides + [fused]]


class PidinetStage1(nn.Module):
    """The first stage of a ``PiDiNet`` on its own (shares its modules), for export."""

    def __init__(self, net: PiDiNet):
        super().__init__()
        self.init_block = net.init_block
        self.blocks = nn.ModuleList(getattr(net, f"block1_{b}") for b in range(1, net.num_blocks[0] + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.init_block(x)
        for block in self.blocks:
            x = block(x)
        return x


def build_pidinet(state_dict: dict[str, torch.Tensor], source: str | Path, config: str = "baseline") -> PiDiNet:
    if config not in CONFIGS:
        raise ValueError(f"{source}: unknown PIDINet configuration {config!r} (known: {sorted(CONFIGS)}); "
                         "set precompute.checkpoints.pidinet.variant")
    if "init_block.weight" not in state_dict:
        raise ValueError(f"{source}: not a PIDINet checkpoint (no init_block.weight; "
                         f"first keys: {list(state_dict)[:5]})")
    width = int(state_dict["init_block.weight"].shape[0])
    dil = int(state_dict["dilations.0.conv1.weight"].shape[0]) if "dilations.0.conv1.weight" in state_dict else None
    sa = "attentions.0.conv1.weight" in state_dict
    net = PiDiNet(CONFIGS[config], width=width, dil=dil, sa=sa)
    load_strict(net, {k: v.float() for k, v in state_dict.items()}, source)
    return net


# -------------------------------------------------------------------------- anchor
class PidinetAnchor(AnchorModel):
    name = "pidinet"
    network = "net"
    input_size = INPUT_SIZE

    def __init__(self, net: PiDiNet, config: str, ckpt_path: str):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.config = config
        self.ckpt_path = ckpt_path

    def dims(self) -> dict[str, int]:
        return {"map_h": self.input_size, "map_w": self.input_size}

    @torch.inference_mode()
    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        # fp32 always: the net is tiny. Output 0 is side 1 (the stage-1 branch), already through its sigmoid
        side1 = self.net(prepare_views(views, self.net, self.input_size, self.name))[0]
        return to_host({"edges": side1[:, 0].float()})

    def export_decoders(self, out_dir: Path) -> list[str]:
        """``PIDINET_STAGE1_PROGRAM`` (torch.export, dynamic batch, fixed HxW) and its JSON description."""
        out_dir = Path(out_dir)
        program = export_stage1(self.net, self.input_size)
        atomic_save(out_dir / PIDINET_STAGE1_PROGRAM, lambda buffer: torch.export.save(program, buffer))
        meta = {
            "input_size": self.input_size,
            "channels": int(self.net.init_block.weight.shape[0]),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input": "float RGB in [0,1] normalised by mean/std, (B,3,H,W)",
            "config": self.config,
            "checkpoint_sha256": self.fingerprint()["sha256"],
        }
        with atomic_file(out_dir / PIDINET_STAGE1_META) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
        return [PIDINET_STAGE1_PROGRAM, PIDINET_STAGE1_META]

    def fingerprint(self) -> dict:
        return {
            **self.checkpoint_fields(self.ckpt_path),
            "variant": self.config,
            "input_size": self.input_size,
            "preprocessing": (f"square view {self.input_size}x{self.input_size} RGB /255, normalised mean "
                              f"{IMAGENET_MEAN} std {IMAGENET_STD}; sigmoid of side output 1, fp32"),
            "dtype": "fp32",
            "torch": torch.__version__,
        }


def export_stage1(net: PiDiNet, size: int) -> torch.export.ExportedProgram:
    """First stage on the CPU (a device-neutral artifact), batch dynamic, ``size`` x ``size`` fixed."""
    import copy

    module = copy.deepcopy(PidinetStage1(net)).cpu().float().eval()
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised away
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})


def load_pidinet(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> PidinetAnchor:
    path = checkpoint_file("pidinet", ckpt, WHERE_TO_GET)
    config = ckpt.variant or "baseline"
    net = build_pidinet(read_checkpoint(path), path, config)
    anchor = PidinetAnchor(net.to(device), config, str(path))
    if ckpt.input_size is not None:
        anchor.input_size = ckpt.input_size  # the edge maps, the views and the exported stage 1 follow it
    return anchor
