"""Per-array codecs: how a target array is stored in zarr and turned back into numbers.

A codec maps a batch ``(B, *shape)`` to one or more stored arrays, named by a
suffix (``""`` is the main one; ``fp8`` adds a per-sample ``"scale"``), and back.

- float arrays: ``bf16`` (default, stored as its uint16 bit pattern), ``fp16``,
  ``fp32`` (lossless), ``fp8`` (e4m3 with a per-sample scale; opt-in, lossy).
- masks: ``packbits`` (bool, 8 pixels a byte along the flattened last two dims).
- counts: ``int32``.

Lossy codecs are measured by the writer on what it writes (max abs and
relative L2 error) and the numbers go into the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shards.anchors import TargetKind

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
FP16_MAX = 65504.0


class CodecError(ValueError):
    pass


@dataclass(frozen=True)
class StoredArray:
    suffix: str  # "" for the main array
    dtype: np.dtype
    shape: tuple[int, ...]  # per sample


class Codec:
    name: str
    kind: TargetKind
    lossy: bool = False

    def stored(self, shape: tuple[int, ...]) -> list[StoredArray]:
        raise NotImplementedError

    def encode(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, stored: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """``stored`` arrays of a batch ``(B, ...)`` -> ``(B, *shape)``."""
        raise NotImplementedError


class _TorchFloat(Codec):
    kind = "float"
    torch_dtype: torch.dtype
    bits_dtype: np.dtype  # what the bit pattern is stored as

    def stored(self, shape):
        return [StoredArray("", np.dtype(self.bits_dtype), tuple(shape))]

    def encode(self, batch):
        t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.torch_dtype)
        return {"": t.view(torch.int16).numpy().view(self.bits_dtype)}

    def decode(self, stored, shape):
        bits = np.ascontiguousarray(stored[""]).view(np.int16)
        return torch.from_numpy(bits).view(self.torch_dtype).float().numpy()


class BF16(_TorchFloat):
    name, lossy, torch_dtype, bits_dtype = "bf16", True, torch.bfloat16, np.dtype(np.uint16)


class FP16(_TorchFloat):
    name, lossy, torch_dtype, bits_dtype = "fp16", True, torch.float16, np.dtype(np.float16)

    def encode(self, batch):
        peak = float(np.abs(batch).max()) if batch.size else 0.0
        if peak > FP16_MAX:
            raise CodecError(f"fp16 cannot hold values up to {peak:g} (max {FP16_MAX:g}); use bf16 or fp32")
        return super().encode(batch)


class FP32(Codec):
    name, kind = "fp32", "float"

    def stored(self, shape):
        return [StoredArray("", np.dtype(np.float32), tuple(shape))]

    def encode(self, batch):
        return {"": np.ascontiguousarray(batch, dtype=np.float32)}

    def decode(self, stored, shape):
        return np.asarray(stored[""], dtype=np.float32)


class FP8(Codec):
    """float8 e4m3 of ``x / scale`` with ``scale = max|x| / 448`` per sample."""

    name, kind, lossy = "fp8", "float", True

    def stored(self, shape):
        return [StoredArray("", np.dtype(np.uint8), tuple(shape)), StoredArray("scale", np.dtype(np.float32), ())]

    def encode(self, batch):
        x = np.ascontiguousarray(batch, dtype=np.float32)
        peak = np.abs(x.reshape(len(x), -1)).max(axis=1) if x.size else np.zeros(len(x), np.float32)
        scale = np.where(peak > 0, peak / FP8_MAX, 1.0).astype(np.float32)
        scaled = torch.from_numpy(x / scale.reshape((-1,) + (1,) * (x.ndim - 1)))
        return {"": scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), "scale": scale}

    def decode(self, stored, shape):
        q = torch.from_numpy(np.ascontiguousarray(stored[""])).view(torch.float8_e4m3fn).float().numpy()
        scale = np.asarray(stored["scale"], dtype=np.float32)
        return q * scale.reshape((-1,) + (1,) * (q.ndim - 1))


class PackBits(Codec):
    name, kind = "packbits", "mask"

    def stored(self, shape):
        lead, plane = tuple(shape[:-2]), int(np.prod(shape[-2:]))
        return [StoredArray("", np.dtype(np.uint8), lead + ((plane + 7) // 8,))]

    def encode(self, batch):
        b = np.ascontiguousarray(batch, dtype=bool)
        flat = b.reshape(b.shape[:-2] + (-1,))
        return {"": np.packbits(flat, axis=-1)}

    def decode(self, stored, shape):
        packed = np.asarray(stored[""], dtype=np.uint8)
        plane = int(np.prod(shape[-2:]))
        bits = np.unpackbits(packed, axis=-1, count=plane).astype(bool)
        return bits.reshape(packed.shape[:1] + tuple(shape))


class Int32(Codec):
    name, kind = "int32", "count"

    def stored(self, shape):
        return [StoredArray("", np.dtype(np.int32), tuple(shape))]

    def encode(self, batch):
        return {"": np.ascontiguousarray(batch, dtype=np.int32)}

    def decode(self, stored, shape):
        return np.asarray(stored[""], dtype=np.int32)


CODECS: dict[str, Codec] = {c.name: c for c in (BF16(), FP16(), FP32(), FP8(), PackBits(), Int32())}
DEFAULT_FOR_KIND: dict[str, str] = {"mask": "packbits", "count": "int32"}


def get_codec(name: str, kind: TargetKind, where: str = "") -> Codec:
    """The codec called ``name`` for an array of ``kind``; ``where`` names the array in errors."""
    codec = CODECS.get(name)
    if codec is None:
        raise CodecError(f"{where}: unknown codec {name!r} (known: {list(CODECS)})")
    if codec.kind != kind:
        fits = [c.name for c in CODECS.values() if c.kind == kind]
        raise CodecError(f"{where}: codec {name!r} is for {codec.kind} arrays, this one is {kind} (use one of {fits})")
    return codec


def codec_for(anchor: str, array: str, kind: TargetKind, default_float: str, overrides: dict[str, str]) -> Codec:
    key = f"{anchor}/{array}"
    name = overrides.get(key) or (default_float if kind == "float" else DEFAULT_FOR_KIND[kind])
    return get_codec(name, kind, f"cache.codecs[{key}]" if key in overrides else key)


def stored_name(array: str, suffix: str) -> str:
    """zarr array name of one stored part of ``array``."""
    return f"{array}.{suffix}" if suffix else array
