"""Lossy codecs re-measured on the user's own first shard before an anchor is declared.

``cache.codec: auto`` picks per array the smallest codec whose head errors stayed
within 1% in bench/bench_codecs.py, measured there with random-weight anchors (bar
PIDINet). Real features may compress differently (a low-rank codec especially), so
rank 0 computes the first shard's targets, encodes each array whose codec is in
:data:`shards.codecs.MEASURED_ON_DATA` and keeps the codec only if its relative L2
error there is within the bound: ``cache.codec_max_error`` if set, else the array's
validated bound (the error at which the bench's head errors would reach 1%,
``shards/codec_defaults.json``); otherwise the array falls back to bf16. An array
with neither bound (a codec the bench did not validate for it) is not calibrated.
The choice and the numbers behind it are part of the anchor's declaration (and so
of the manifest); the measured shard's targets are then committed as is.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from covt.anchors import get_anchor
from shards.codecs import MEASURED_ON_DATA, validated_error_bound
from shards.writer import CacheWriter

log = logging.getLogger(__name__)
FALLBACK = "bf16"


def error_bound(writer: CacheWriter, anchor: str, array: str, override: float | None) -> float | None:
    """The relative L2 bound ``anchor/array``'s codec is held to on the data, or None (not calibrated)."""
    codec = writer.codec_choice(anchor, array).name
    if get_anchor(anchor).array(array).kind != "float" or codec not in MEASURED_ON_DATA:
        return None
    return override if override is not None else validated_error_bound(f"{anchor}/{array}", codec)


def needs_calibration(writer: CacheWriter, anchor: str, override: float | None = None) -> bool:
    """True if ``anchor`` is not declared yet and one of its arrays has a codec to measure on the data."""
    if writer.declaration(anchor) is not None:
        return False
    return any(error_bound(writer, anchor, a.name, override) is not None for a in get_anchor(anchor).arrays)


def calibrate(writer: CacheWriter, anchor: str, first_shard: dict[str, np.ndarray], override: float | None = None,
              ) -> tuple[dict[str, str], dict[str, dict]]:
    """Codec per array and the calibration record, from the first shard's targets ``first_shard``."""
    codecs, calibration = {}, {}
    n = len(next(iter(first_shard.values())))
    for spec in get_anchor(anchor).arrays:
        bound = error_bound(writer, anchor, spec.name, override)
        if bound is None:
            continue
        codec = writer.codec_choice(anchor, spec.name)
        _, err = codec.encode_measured(first_shard[spec.name])
        rel = math.sqrt(err["sum_sq_err"] / err["sum_sq_ref"]) if err["sum_sq_ref"] > 0 else 0.0
        kept = rel <= bound
        codecs[spec.name] = codec.name if kept else FALLBACK
        calibration[spec.name] = {"codec": codec.name, "rel_l2": rel, "bound": bound, "samples": n,
                                  "fell_back_to": None if kept else FALLBACK}
        if not kept:
            log.warning("%s/%s: codec %s errs %.3g (relative L2) on the first shard, above its bound %.3g "
                        "(cache.codec_max_error or shards/codec_defaults.json); storing it as %s instead",
                        anchor, spec.name, codec.name, rel, bound, FALLBACK)
    return codecs, calibration


def declared_choice(writer: CacheWriter, anchor: str) -> tuple[dict[str, str], dict[str, dict]]:
    """For an anchor declared by an earlier run: the calibrated codecs it settled on, so a rerun with the same
    settings declares the same thing (a changed ``cache.codec`` still differs, and is refused as before)."""
    decl = writer.declaration(anchor)
    codecs, calibration = {}, {}
    for name, info in (decl or {}).get("arrays", {}).items():
        calib = info.get("calibration")
        if calib and calib["codec"] == writer.codec_choice(anchor, name).name:
            codecs[name], calibration[name] = info["codec"], calib
    return codecs, calibration
