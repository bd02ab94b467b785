"""Per-array codecs: how a target array is stored in zarr and turned back into numbers.

A codec maps a batch ``(B, *shape)`` to one or more stored arrays, named by a
suffix (``""`` is the main one; ``fp8`` adds a per-sample ``"scale"``), and back.

- float arrays: ``bf16`` (default, stored as its uint16 bit pattern), ``fp16``,
  ``fp32`` (lossless), ``fp8`` (e4m3 with a per-sample scale; opt-in, lossy).
- masks: ``packbits`` (bool, 8 pixels a byte along the flattened last two dims).
- counts: ``int32``.

Lossy codecs are measured on what they write (:meth:`Codec.encode_measured`:
max abs and relative L2 error) and the writer puts the numbers in the manifest.

Separately from the codec, each stored array has a *compression* (a zarr
compressor inside the sharding codec, recorded in the anchor's declaration and
the array's zarr metadata): ``none`` or ``zstd-<level>``. bf16 network features
barely compress (zstd saves ~20%, at any level), masks and counts do; see
:data:`COMPRESSION_DEFAULTS`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import ZstdCodec

from covt.anchors import TargetKind

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

    def encode_measured(self, batch: np.ndarray) -> tuple[dict[str, np.ndarray], dict | None]:
        """``encode(batch)`` and, for a lossy codec, the error of decoding it again (``None`` if lossless)."""
        parts = self.encode(batch)
        if not self.lossy:
            return parts, None
        stats = ErrorStats()
        stats.add(np.asarray(batch, dtype=np.float32), self.decode(parts, tuple(batch.shape[1:])))
        return parts, stats.as_dict()


BLOCK = 1 << 18  # elements per step of the blocked loops: ~1 MB of float32 stays in cache


class ErrorStats:
    """max |decoded - x|, sum (decoded - x)^2 and sum x^2, accumulated block by block.

    float32 arithmetic with numpy's pairwise sums per block, added up in a fixed
    order: deterministic (the manifest is rewritten byte for byte on resume) and
    no float64 copies of big arrays.
    """

    def __init__(self):
        self.max_abs = self.sum_sq_err = self.sum_sq_ref = 0.0

    def add_block(self, x: np.ndarray, err: np.ndarray, scratch: np.ndarray) -> None:
        """``err`` (overwritten) is decoded - x for the 1-d float32 block ``x``; ``scratch`` is as long."""
        if not x.size:
            return
        np.abs(err, out=scratch)
        self.max_abs = max(self.max_abs, float(scratch.max()))
        self.sum_sq_err += self._sum_sq(err, scratch)
        self.sum_sq_ref += self._sum_sq(x, scratch)

    @staticmethod
    def _sum_sq(v: np.ndarray, scratch: np.ndarray) -> float:
        with np.errstate(over="ignore"):
            np.square(v, out=scratch)
            total = float(scratch.sum())
        if not np.isfinite(total):  # values beyond ~1e17 overflow float32 squares: redo this block in float64
            total = float(np.square(v, dtype=np.float64).sum())
        return total

    def add(self, x: np.ndarray, decoded: np.ndarray) -> None:
        flat, dec = np.ascontiguousarray(x, dtype=np.float32).reshape(-1), np.asarray(decoded).reshape(-1)
        err, scratch = np.empty(min(BLOCK, flat.size), np.float32), np.empty(min(BLOCK, flat.size), np.float32)
        for lo in range(0, flat.size, BLOCK):
            hi = min(lo + BLOCK, flat.size)
            e = err[:hi - lo]
            np.subtract(dec[lo:hi], flat[lo:hi], out=e)
            self.add_block(flat[lo:hi], e, scratch[:hi - lo])

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "sum_sq_err": self.sum_sq_err, "sum_sq_ref": self.sum_sq_ref}


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


_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # index of a uint32's upper 16 bits among its two uint16s


class BF16(Codec):
    """bfloat16 stored as its uint16 bit pattern: float32 rounded to nearest even, as ``torch.bfloat16`` does.

    Integer arithmetic on the float32 bits, a cache-sized block at a time, fused
    with the error measurement (the decoded value is the rounded bits with the
    low half zeroed, so it never needs its own full-size array). Inputs are
    finite (the writer checks); numpy releases the GIL, so threads overlap.
    """

    name, kind, lossy = "bf16", "float", True

    def stored(self, shape):
        return [StoredArray("", np.dtype(np.uint16), tuple(shape))]

    def encode(self, batch):
        return self._encode(batch, None)

    def encode_measured(self, batch):
        stats = ErrorStats()
        parts = self._encode(batch, stats)
        if not np.isfinite(stats.max_abs):
            peak = float(np.abs(batch).max())
            raise CodecError(f"bf16 cannot hold values up to {peak:g} (they round to inf); use fp32")
        return parts, stats.as_dict()

    @staticmethod
    def _encode(batch: np.ndarray, stats: ErrorStats | None) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        flat, out = x.reshape(-1), np.empty(x.shape, np.uint16)
        bits, out_flat = flat.view(np.uint32), out.reshape(-1)
        step = min(BLOCK, flat.size)
        rounded, scratch = np.empty(step, np.uint32), np.empty(step, np.float32)
        for lo in range(0, flat.size, BLOCK):
            hi = min(lo + BLOCK, flat.size)
            r, b = rounded[:hi - lo], bits[lo:hi]
            np.right_shift(b, 16, out=r)
            r &= 1  # round half to even: add 0x7FFF plus the lowest kept bit, then truncate
            r += 0x7FFF
            r += b
            r &= 0xFFFF0000
            out_flat[lo:hi] = r.view(np.uint16)[_HIGH_HALF::2]
            if stats is not None:
                err = r.view(np.float32)
                err -= flat[lo:hi]  # exact in float32: x and its rounding share the exponent range
                stats.add_block(flat[lo:hi], err, scratch[:hi - lo])
        return {"": out}

    def decode(self, stored, shape):
        bits = np.asarray(stored[""]).astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)


class FP16(_TorchFloat):
    name, lossy, torch_dtype, bits_dtype = "fp16", True, torch.float16, np.dtype(np.float16)

    def encode(self, batch):
        peak = float(np.abs(batch).max()) if batch.size else 0.0
        if peak > FP16_MAX:
            raise CodecError(f"fp16 cannot hold values up to {peak:g} (max {FP16_MAX:g}); use bf16 or fp32")
        return super().encode(batch)


class _Plain(Codec):
    """Stored as-is in ``dtype`` (lossless)."""

    dtype: np.dtype

    def stored(self, shape):
        return [StoredArray("", np.dtype(self.dtype), tuple(shape))]

    def encode(self, batch):
        return {"": np.ascontiguousarray(batch, dtype=self.dtype)}

    def decode(self, stored, shape):
        return np.asarray(stored[""], dtype=self.dtype)


class FP32(_Plain):
    name, kind, dtype = "fp32", "float", np.float32


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


def fp8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float8 e4m3 bits of ``x / scale`` with one ``scale = max|row| / 448`` per row (last axis)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    scale = np.where(peak > 0, peak / FP8_MAX, 1.0).astype(np.float32)
    scaled = torch.from_numpy(x / scale[..., None])
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), scale


def from_fp8_rows(bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float().numpy()
    return q * np.asarray(scale, dtype=np.float32)[..., None]


class FP8Row(Codec):
    """float8 e4m3 with a float32 scale per row (the last axis: a token's features, a map's row).

    A row's own peak sets its scale, so a row of small values keeps its 3 mantissa
    bits instead of sinking into e4m3's subnormals (below 2^-6 of the scale) against
    the sample's largest value, as with ``fp8``'s one scale per sample. Costs 4 bytes
    a row (0.4% on 1024 features).
    """

    name, kind, lossy = "fp8row", "float", True

    def stored(self, shape):
        return [StoredArray("", np.dtype(np.uint8), tuple(shape)),
                StoredArray("scale", np.dtype(np.float32), tuple(shape[:-1]))]

    def encode(self, batch):
        bits, scale = fp8_rows(batch)
        return {"": bits, "scale": scale}

    def decode(self, stored, shape):
        return from_fp8_rows(stored[""], stored["scale"])


class LowRank(Codec):
    """Per sample, each matrix of the last two axes (``M x N``, e.g. one layer's patches x features) as the
    rank-``rank`` product ``U V`` of its truncated SVD (``U`` holds the singular values), the factors in
    bf16 or fp8 with a scale per row. Stores ``rank * (M + N)`` numbers instead of ``M * N``.

    The SVD is randomised (a seeded Gaussian range finder with two power iterations, then an exact SVD
    of the small projected matrix), so encoding one 1369 x 1024 layer costs about 1 GFLOP, on the GPU
    where there is one, and the same input on the same machine gives the same bytes (resume rewrites
    identical shards).
    """

    kind, lossy = "float", True
    OVERSAMPLE, POWER_ITERATIONS = 16, 2

    def __init__(self, rank: int, factors: str):
        self.rank, self.factors = rank, factors
        self.name = f"lowrank{rank}" + ("-fp8" if factors == "fp8row" else "")

    def _rank(self, shape) -> int:
        if len(shape) < 2:
            raise CodecError(f"{self.name} needs arrays of at least 2 axes per sample, got shape {tuple(shape)}")
        return min(self.rank, shape[-2], shape[-1])

    def stored(self, shape):
        r, lead = self._rank(shape), tuple(shape[:-2])
        u, v = lead + (shape[-2], r), lead + (r, shape[-1])
        if self.factors == "bf16":
            return [StoredArray("", np.dtype(np.uint16), u), StoredArray("v", np.dtype(np.uint16), v)]
        return [StoredArray("", np.dtype(np.uint8), u), StoredArray("scale", np.dtype(np.float32), u[:-1]),
                StoredArray("v", np.dtype(np.uint8), v), StoredArray("v_scale", np.dtype(np.float32), v[:-1])]

    def factorise(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` (K, M, N) float32 -> U (K, M, r) with the singular values folded in, V (K, r, N)."""
        r = self._rank(a.shape)
        k = min(r + self.OVERSAMPLE, a.shape[-2], a.shape[-1])
        omega = torch.randn(a.shape[-1], k, generator=torch.Generator().manual_seed(0)).to(a.device)
        q = torch.linalg.qr(a @ omega).Q
        for _ in range(self.POWER_ITERATIONS):  # sharpen the range towards the top singular vectors
            q = torch.linalg.qr(a @ torch.linalg.qr(a.transpose(-1, -2) @ q).Q).Q
        b = q.transpose(-1, -2) @ a  # (K, k, N): a's rows in the found basis
        # SVD of the small b through the eigenvectors of b b^T (k x k, in float64): cheaper than an SVD
        # of b on a CPU; the top r of its k directions are accurate, the oversampled tail is dropped
        evals, evecs = torch.linalg.eigh((b @ b.transpose(-1, -2)).double())
        top = evecs[..., -r:].flip(-1).float()  # (K, k, r), largest eigenvalue first
        return q @ top, top.transpose(-1, -2) @ b

    def encode(self, batch):
        x = np.ascontiguousarray(batch, dtype=np.float32)
        shape = x.shape[1:]
        r = self._rank(shape)
        us = np.empty(x.shape[:-1] + (r,), np.float32)
        vs = np.empty(x.shape[:-2] + (r, x.shape[-1]), np.float32)
        device = factorising_device()
        for i in range(len(x)):  # one sample's matrices at a time: a shard of them would not fit in memory
            mats = torch.from_numpy(x[i]).reshape(-1, *shape[-2:]).to(device)
            u, v = self.factorise(mats)
            us[i], vs[i] = u.reshape(us.shape[1:]).cpu().numpy(), v.reshape(vs.shape[1:]).cpu().numpy()
        if self.factors == "bf16":
            return {"": BF16().encode(us)[""], "v": BF16().encode(vs)[""]}
        (ub, us_scale), (vb, vs_scale) = fp8_rows(us), fp8_rows(vs)
        return {"": ub, "scale": us_scale, "v": vb, "v_scale": vs_scale}

    def decode(self, stored, shape):
        if self.factors == "bf16":
            u, v = BF16().decode({"": stored[""]}, ()), BF16().decode({"": stored["v"]}, ())
        else:
            u, v = from_fp8_rows(stored[""], stored["scale"]), from_fp8_rows(stored["v"], stored["v_scale"])
        # torch, not numpy: DataLoader workers run torch on one thread each, while numpy's BLAS would start
        # a thread per core in every worker (8 workers on 16 cores read 4x slower, bench_cache_read --codec auto)
        return torch.from_numpy(np.ascontiguousarray(u)).matmul(torch.from_numpy(np.ascontiguousarray(v))).numpy()


def factorising_device() -> torch.device:
    """Where low-rank codecs factorise: the GPU where there is one (precompute runs beside its anchors; a
    few ms per sample instead of ~0.1-1 s of CPU time per sample, which would throttle precompute)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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


class Int32(_Plain):
    name, kind, dtype = "int32", "count", np.int32


# floats uncompressed: zstd-1 would save ~20% of the disk on bf16 features but costs ~1 ms of CPU per MB,
# more than bf16 rounding, zarr's copies and the checksums together (bench/bench_cache_write.py);
# packed masks shrink several times
COMPRESSION_DEFAULTS: dict[str, str] = {"float": "none", "mask": "zstd-3", "count": "zstd-3"}


def zarr_compressors(spec: str, where: str = "") -> list:
    """The zarr compressors of a compression spec: ``none`` or ``zstd-<level>`` (level 1..22)."""
    if spec == "none":
        return []
    name, _, level = spec.partition("-")
    if name == "zstd" and level.isdigit() and 1 <= int(level) <= 22:
        return [ZstdCodec(level=int(level), checksum=True)]
    raise CodecError(f"{where}: unknown compression {spec!r} (use 'none' or 'zstd-<level>', e.g. zstd-1)")


LOW_RANKS = (32, 64, 128, 256)
CODECS: dict[str, Codec] = {c.name: c for c in (
    BF16(), FP16(), FP32(), FP8(), FP8Row(), PackBits(), Int32(),
    *(LowRank(r, factors) for r in LOW_RANKS for factors in ("bf16", "fp8row")),
)}
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


# cache.codec "auto": per float array, the smallest codec whose head loss and gradient errors stayed within 1%
# in bench/bench_codecs.py, which writes this file with the measurements behind each choice (BENCHMARKS.md)
AUTO_DEFAULTS_FILE = Path(__file__).with_name("codec_defaults.json")
AUTO_DEFAULTS: dict = json.loads(AUTO_DEFAULTS_FILE.read_text())
AUTO_CODECS: dict[str, str] = {key: entry["codec"] for key, entry in AUTO_DEFAULTS["arrays"].items()}
AUTO = "auto"
# codecs whose error depends on the data enough to be re-measured on the user's first shard
MEASURED_ON_DATA = frozenset(n for n, c in CODECS.items() if c.lossy and n not in ("bf16", "fp16"))


def validated_error_bound(key: str, codec: str) -> float | None:
    """The relative L2 error up to which ``codec`` keeps ``key``'s head errors within the bench's bound
    (its measured error scaled by bound / measured head error), if the bench validated that pair."""
    entry = AUTO_DEFAULTS["arrays"].get(key)
    return entry["max_rel_l2"] if entry and entry["codec"] == codec else None


def check_default_codec(name: str) -> None:
    """``cache.codec``: ``auto`` or a float codec."""
    if name != AUTO:
        get_codec(name, "float", "cache.codec")


def codec_for(anchor: str, array: str, kind: TargetKind, default_float: str, overrides: dict[str, str]) -> Codec:
    key = f"{anchor}/{array}"
    if default_float == AUTO:
        default_float = AUTO_CODECS.get(key, "bf16")
    name = overrides.get(key) or (default_float if kind == "float" else DEFAULT_FOR_KIND[kind])
    return get_codec(name, kind, f"cache.codecs[{key}]" if key in overrides else key)


def stored_name(array: str, suffix: str) -> str:
    """zarr array name of one stored part of ``array``."""
    return f"{array}.{suffix}" if suffix else array


def stored_suffix(array: str, stored: str) -> str:
    """The codec suffix of the stored part ``stored`` of ``array`` (inverse of :func:`stored_name`)."""
    return stored[len(array) + 1:] if stored != array else ""
