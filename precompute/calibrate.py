"""Lossy codecs re-measured on the user's own first shard before an anchor is declared.

``cache.codec: auto`` picks per array the smallest codec whose head errors stayed
within 1% in bench/bench_codecs.py, measured there with random-weight anchors (bar
PIDINet). Real features may compress differently (a low-rank codec especially), so
rank 0 computes the first shard's targets, encodes each array whose codec is in
:data:`shards.codecs.MEASURED_ON_DATA` and keeps the codec only if its relative L2
error there is within ``cache.codec_max_error``; otherwise the array falls back to
bf16. The choice and the numbers behind it are part of the anchor's declaration
(and so of the manifest); the measured shard's targets are then committed as is.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from shards.anchors import get_anchor
from shards.codecs import MEASURED_ON_DATA
from shards.writer import CacheWriter

log = logging.getLogger(__name__)
FALLBACK = "bf16"


def needs_calibration(writer: CacheWriter, anchor: str) -> bool:
    """True if ``anchor`` is not declared yet and one of its arrays has a codec measured on the data."""
    if writer.declaration(anchor) is not None:
        return False
    return any(writer.codec_choice(anchor, a.name).name in MEASURED_ON_DATA
               for a in get_anchor(anchor).arrays if a.kind == "float")


def calibrate(writer: CacheWriter, anchor: str, first_shard: dict[str, np.ndarray], bound: float,
              ) -> tuple[dict[str, str], dict[str, dict]]:
    """Codec per array and the calibration record, from the first shard's targets ``first_shard``."""
    codecs, calibration = {}, {}
    n = len(next(iter(first_shard.values())))
    for spec in get_anchor(anchor).arrays:
        codec = writer.codec_choice(anchor, spec.name)
        if spec.kind != "float" or codec.name not in MEASURED_ON_DATA:
            continue
        _, err = codec.encode_measured(first_shard[spec.name])
        rel = math.sqrt(err["sum_sq_err"] / err["sum_sq_ref"]) if err["sum_sq_ref"] > 0 else 0.0
        kept = rel <= bound
        codecs[spec.name] = codec.name if kept else FALLBACK
        calibration[spec.name] = {"codec": codec.name, "rel_l2": rel, "bound": bound, "samples": n,
                                  "fell_back_to": None if kept else FALLBACK}
        if not kept:
            log.warning("%s/%s: codec %s errs %.3g (relative L2) on the first shard, above cache.codec_max_error="
                        "%.3g; storing it as %s instead", anchor, spec.name, codec.name, rel, bound, FALLBACK)
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
