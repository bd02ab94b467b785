"""The square view of an image: what the VLM sees and what every anchor computes from.

Resizing goes straight from the original to the requested side (never through a
smaller thumbnail), bicubic with antialiasing, ignoring the aspect ratio, as the
VLM's fixed square input does.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file raises here, not later)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def square_view(image: Image.Image, size: int) -> np.ndarray:
    """``size x size x 3`` uint8 RGB view of ``image``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)
