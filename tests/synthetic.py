"""Small complete caches for tests: real records and images, synthetic targets of the right shapes.

The targets are seeded noise shaped by the image (features follow its colours,
depth and edges follow its brightness and gradients, masks are brightness
bands) so a rendered sample is recognisable, and they are a pure function of
``(seed, sample index)`` so rewriting a cache gives the same bytes.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from covt.anchors import array_shape, get_anchor
from covt.config import DataConfig
from covt.images import open_rgb
from precompute.records import load_records
from shards.samples import Record
from shards.storage import is_url, open_writer

DEFAULT_DIMS: dict[str, dict[str, int]] = {
    "sam": {"embed_dim": 32, "embed_h": 8, "embed_w": 8, "max_masks": 8, "mask_h": 32, "mask_w": 32},
    "depth": {"layers": 4, "patches": 16, "dim": 32, "map_h": 32, "map_w": 32},
    "dino": {"tokens": 17, "dim": 32},
    "pidinet": {"map_h": 32, "map_w": 32},
    "siglip": {"dim": 32},
    "metaclip": {"dim": 32},
}


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng([p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts])


def _pixels(img: Image.Image, h: int, w: int) -> np.ndarray:
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _colour_features(img: Image.Image, h: int, w: int, dim: int, proj_rng, noise_rng) -> np.ndarray:
    """``(h*w, dim)`` features: a fixed random projection of colour and position, plus noise."""
    rgb = _pixels(img, h, w).reshape(-1, 3)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    x = np.concatenate([rgb - 0.5, 0.3 * yy.reshape(-1, 1), 0.3 * xx.reshape(-1, 1)], axis=1)
    proj = proj_rng.normal(size=(x.shape[1], dim)).astype(np.float32)
    return (np.tanh(x @ proj) + 0.05 * noise_rng.normal(size=(h * w, dim))).astype(np.float32)


def _grid(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else (1, n)


def _gray(img: Image.Image, h: int, w: int) -> np.ndarray:
    return _pixels(img, h, w) @ np.array([0.299, 0.587, 0.114], np.float32)


def synthetic_targets(anchor: str, dims: dict[str, int], img: Image.Image, index: int,
                      seed: int) -> dict[str, np.ndarray]:
    """One sample's targets for ``anchor`` (no batch dimension)."""
    noise = _rng(seed, anchor, index)

    def proj(tag):  # the same projection for every sample
        return _rng(seed, anchor, "projection", tag)

    shape = {a.name: array_shape(anchor, a.name, dims) for a in get_anchor(anchor).arrays}
    if anchor == "sam":
        d, h, w = shape["embedding"]
        emb = _colour_features(img, h, w, d, proj(0), noise).T.reshape(d, h, w)
        m, mh, mw = shape["masks"]
        gray = _gray(img, mh, mw)
        count = int(noise.integers(1, m + 1))
        edges = np.quantile(gray, np.linspace(0, 1, count + 1))
        masks = np.zeros((m, mh, mw), bool)
        for k in range(count):
            masks[k] = (gray >= edges[k]) & (gray <= edges[k + 1])
        return {"embedding": emb, "masks": masks, "mask_count": np.int32(count)}
    if anchor == "depth":
        layers, patches, d = shape["features"]
        gh, gw = _grid(patches)
        feats = np.stack([_colour_features(img, gh, gw, d, proj(layer), noise) for layer in range(layers)])
        mh, mw = shape["depth"]
        ramp = np.linspace(0, 1, mh, dtype=np.float32)[:, None]
        depth = 0.6 * ramp + 0.4 * _gray(img, mh, mw)
        depth = (depth - depth.min()) / max(float(np.ptp(depth)), 1e-6)
        return {"features": feats, "depth": depth.astype(np.float32)}
    if anchor == "dino":
        tokens, d = shape["features"]
        gh, gw = _grid(tokens - 1)
        cls = noise.normal(size=(1, d)).astype(np.float32)
        return {"features": np.concatenate([cls, _colour_features(img, gh, gw, d, proj(0), noise)])}
    if anchor == "pidinet":
        h, w = shape["edges"]
        gray = _gray(img, h, w)
        gy, gx = np.gradient(gray)
        mag = np.hypot(gx, gy)
        return {"edges": (mag / max(float(mag.max()), 1e-6)).astype(np.float32)}
    if anchor in ("siglip", "metaclip"):
        (d,) = shape["embedding"]
        v = noise.normal(size=d).astype(np.float32)
        return {"embedding": v / np.linalg.norm(v)}
    raise KeyError(f"no synthetic targets for anchor {anchor!r}")


def synthetic_shard_targets(anchor: str, dims: dict[str, int], records: list[Record],
                            seed: int) -> dict[str, np.ndarray]:
    per_sample = [synthetic_targets(anchor, dims, open_rgb(r.images[0].read_bytes()), r.index, seed)
                  for r in records]
    return {name: np.stack([s[name] for s in per_sample]) for name in per_sample[0]}


def write_synthetic_cache(cache_dir: str | Path, data_cfg: DataConfig, anchors: list[str],
                          dims: dict[str, dict[str, int]] | None = None, shard_size: int = 4, seed: int = 0,
                          default_codec: str = "bf16", codecs: dict[str, str] | None = None,
                          subset: dict | None = None, staging: str | Path | None = None,
                          decoders: dict[str, Callable[[Path], list[str]]] | None = None) -> str | Path:
    """Write (or finish writing) a complete cache of ``data_cfg``'s records with synthetic targets;
    ``decoders``: anchor -> a function that writes its decoder files into a folder and returns their names."""
    dims = {**DEFAULT_DIMS, **(dims or {})}
    records, bad = load_records(data_cfg)
    writer = open_writer(cache_dir, records, shard_size, bad, default_codec, codecs or {}, subset=subset,
                         staging=staging)
    for anchor in anchors:
        names = (decoders or {})[anchor](writer.decoders_dir) if anchor in (decoders or {}) else []
        writer.declare_anchor(anchor, dims[anchor], {"synthetic": True, "seed": seed}, names)
    for shard in range(writer.num_shards):
        if not writer.shard_done(shard):
            writer.write_samples(shard)
        for anchor in anchors:
            if not writer.shard_done(shard, anchor):
                writer.write_targets(shard, anchor,
                                     synthetic_shard_targets(anchor, dims[anchor], writer.shard_records(shard), seed))
    writer.finalize()
    return cache_dir if is_url(cache_dir) else Path(cache_dir)


def write_covt_parquet(path: str | Path, rows: list[dict], row_group_size: int = 2,
                       drop_column: str | None = None) -> Path:
    """A parquet file of the published CoVT schema (tests): ``rows`` hold id, image_bytes, image_relpath,
    conversations; ``drop_column`` leaves one column out, as a broken file would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([{"bytes": r["image_bytes"], "path": r["image_relpath"]} for r in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "image_relpath": pa.array([r["image_relpath"] for r in rows], pa.string()),
        "conversations": pa.array([r["conversations"] for r in rows], pa.list_(turn)),
    }
    columns.pop(drop_column, None)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return Path(path)


def sample_parquet_rows(data_cfg: DataConfig) -> list[dict]:
    """The bundled LLaVA sample as rows of the published parquet schema (one image each)."""
    entries = json.loads(Path(data_cfg.path).read_text())
    return [{"id": str(e["id"]), "image_relpath": e["image"],
             "image_bytes": (Path(data_cfg.image_folder) / e["image"]).read_bytes(),
             "conversations": e["conversations"]} for e in entries]
