"""The square view of an image: what the VLM sees and what every anchor computes from.

Resizing goes straight from the original to the requested side (never through a
smaller thumbnail), bicubic with antialiasing, ignoring the aspect ratio, as the
VLM's fixed square input does.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey (PNG, TIFF); PIL's convert clips them


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file raises here, not later); 16-bit grey is scaled to 8 bits
    (PIL's own ``convert`` clips it: every pixel above 255 becomes white); other modes PIL converts."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in INTEGER_MODES:
        img = _sixteen_bit_to_grey(img)
    elif img.mode == "F":
        raise ValueError("image mode F (32-bit float pixels) has no defined 8-bit range; convert it to 8-bit RGB")
    return img.convert("RGB")


def _sixteen_bit_to_grey(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img, dtype=np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(f"image mode {img.mode} with values {pixels.min()}..{pixels.max()} outside the 16-bit "
                         "range 0..65535; convert it to 8-bit RGB")
    return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L")


def square_view(image: Image.Image, size: int) -> np.ndarray:
    """``size x size x 3`` uint8 RGB view of ``image``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)
