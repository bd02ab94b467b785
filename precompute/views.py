"""What each anchor computes its targets from: ``precompute.views``.

``square`` (default): the square view the VLM sees, resized straight from the original
to the anchor's input size (``covt.images.square_view``), the same for every anchor.

``reference``: the inputs the reference implementation (Wakals/CoVT
``train/src/training/covt_qwen2_5_vl.py``) gives its anchors, for anyone comparing with
its released checkpoints. Its faults are reproduced on purpose (README, "Differences
from the reference"):

- sam: ``image.resize((256, 256))`` (PIL bicubic), then SAM's ``ResizeLongestSide`` up to
  the encoder's 1024 (torchvision's resize: PIL bilinear).
- depth: the same 256 thumbnail, up to Depth Anything's 518 (bicubic; the reference's
  OpenCV cubic differs slightly), with the channels reversed: the reference hands PIL's
  RGB array to ``image2tensor``, which converts from OpenCV's BGR.
- dino: ``facebook/dinov2-large``'s processor with ``crop_size`` 448: the short side
  resized to 256 (bicubic, aspect kept), then a 448 centre crop of that smaller image, i.e.
  the image in the middle of zero padding.
- pidinet: the 256 thumbnail (what the square view at 256 already is).
- siglip: SigLIP 2's processor, a bilinear resize of the original to its input size.
- metaclip: CLIP's processor, the short side resized to the input size (bicubic), then a
  centre crop.

PIDINet's other difference, the configuration, is the checkpoint's ``variant`` (carv4).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from covt.images import square_view

REFERENCE_THUMBNAIL = 256  # the reference's image.resize((256, 256))
DINO_SHORT_SIDE = 256  # facebook/dinov2-large's processor: resize shortest_edge 256, then crop_size 448

ViewKey = tuple[str, int]  # (kind, side): "square" or "reference:<anchor>"


def view_key(anchor: str, size: int, mode: str) -> ViewKey:
    """Which view ``anchor`` computes from; anchors with equal keys share one view."""
    if mode == "square":
        return ("square", size)
    if mode == "reference":
        if anchor not in _REFERENCE:
            raise ValueError(f"precompute.views=reference: no reference input known for anchor {anchor!r}")
        return (f"reference:{anchor}", size)
    raise ValueError(f"precompute.views: {mode!r} is not 'square' or 'reference'")


def make_view(image: Image.Image, key: ViewKey) -> np.ndarray:
    """``side x side x 3`` uint8 view of ``image`` (RGB, or BGR where the reference's was)."""
    kind, size = key
    if kind == "square":
        return square_view(image, size)
    return _REFERENCE[kind.removeprefix("reference:")](image.convert("RGB"), size)


def describe(key: ViewKey) -> str:
    """One line for the manifest."""
    kind, size = key
    if kind == "square":
        return f"square view {size}x{size} from the original"
    anchor = kind.removeprefix("reference:")
    return f"the reference's {anchor} input at {size}x{size}: {_NOTES[anchor]}"


def _thumbnail(image: Image.Image) -> Image.Image:
    return image.resize((REFERENCE_THUMBNAIL, REFERENCE_THUMBNAIL), Image.BICUBIC)


def _sam(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(_thumbnail(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _depth(image: Image.Image, size: int) -> np.ndarray:
    rgb = np.asarray(_thumbnail(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def short_side_then_centre(image: Image.Image, short: int, size: int) -> np.ndarray:
    """Resize the short side to ``short`` (aspect kept, bicubic), then a ``size`` centre crop, zero-padded
    where the image is smaller (transformers' ``center_crop``)."""
    w, h = image.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    pixels = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.uint8)
    canvas = np.zeros((max(size, new_h), max(size, new_w), 3), dtype=np.uint8)
    top, left = math.ceil((canvas.shape[0] - new_h) / 2), math.ceil((canvas.shape[1] - new_w) / 2)
    canvas[top:top + new_h, left:left + new_w] = pixels
    y0, x0 = (new_h - size) // 2 + top, (new_w - size) // 2 + left
    return np.ascontiguousarray(canvas[y0:y0 + size, x0:x0 + size])


def _dino(image: Image.Image, size: int) -> np.ndarray:
    return short_side_then_centre(image, DINO_SHORT_SIDE, size)


def _pidinet(image: Image.Image, size: int) -> np.ndarray:
    return square_view(_thumbnail(image), size)


def _siglip(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _metaclip(image: Image.Image, size: int) -> np.ndarray:
    return short_side_then_centre(image, size, size)


_REFERENCE = {"sam": _sam, "depth": _depth, "dino": _dino, "pidinet": _pidinet, "siglip": _siglip,
              "metaclip": _metaclip}
_NOTES = {
    "sam": "256x256 bicubic thumbnail, bilinear up to the encoder size",
    "depth": "256x256 bicubic thumbnail, bicubic up, channels reversed (BGR)",
    "dino": f"short side {DINO_SHORT_SIDE} bicubic, centre crop with zero padding",
    "pidinet": "256x256 bicubic thumbnail",
    "siglip": "bilinear resize of the original",
    "metaclip": "short side bicubic, centre crop",
}
