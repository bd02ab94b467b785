"""The small codecs (fp8 per row, per-sample low rank) and their calibration on the first shard."""
import numpy as np
import pytest

from precompute.calibrate import calibrate, declared_choice, error_bound, needs_calibration
from precompute.records import load_records
from shards.codecs import AUTO_CODECS, AUTO_DEFAULTS, CODECS, CodecError
from shards.reader import Cache
from shards.writer import CacheWriter
from tests.synthetic import DEFAULT_DIMS, synthetic_shard_targets


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def low_rank(rng, shape, rank):
    *lead, m, n = shape
    return (rng.standard_normal((*lead, m, rank)) @ rng.standard_normal((*lead, rank, n))).astype(np.float32)


def test_fp8row_scales_each_row_so_small_rows_keep_their_precision():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    x[:, 0] *= 1e6  # one huge row: a per-sample scale would flush the others to (sub)normal zero
    codec = CODECS["fp8row"]
    parts = codec.encode(x)
    assert parts[""].dtype == np.uint8 and parts["scale"].shape == (2, 5)
    y = codec.decode(parts, x.shape[1:])
    assert max(rel_l2(x[:, i], y[:, i]) for i in range(5)) < 0.05
    assert rel_l2(x[:, 1:], CODECS["fp8"].decode(CODECS["fp8"].encode(x), x.shape[1:])[:, 1:]) > 0.2


@pytest.mark.parametrize("name", ["lowrank32", "lowrank32-fp8"])
def test_low_rank_recovers_a_low_rank_sample_and_is_deterministic(name):
    x = low_rank(np.random.default_rng(1), (2, 3, 90, 70), 20)
    codec = CODECS[name]
    parts, err = codec.encode_measured(x)
    stored = {p.suffix: p.shape for p in codec.stored(x.shape[1:])}
    assert {k: v.shape[1:] for k, v in parts.items()} == stored
    assert stored[""] == (3, 90, 32) and stored["v"] == (3, 32, 70)
    bound = 1e-2 if name == "lowrank32" else 6e-2  # bf16 or fp8 factors
    assert rel_l2(x, codec.decode(parts, x.shape[1:])) < bound
    assert np.sqrt(err["sum_sq_err"] / err["sum_sq_ref"]) < bound
    again = codec.encode(x)
    assert all(np.array_equal(again[k], parts[k]) for k in parts)


def test_low_rank_drops_what_is_beyond_its_rank_and_refuses_vectors():
    x = np.random.default_rng(2).standard_normal((1, 200, 100)).astype(np.float32)  # full rank noise
    assert rel_l2(x, CODECS["lowrank32"].decode(CODECS["lowrank32"].encode(x), (200, 100))) > 0.5
    with pytest.raises(CodecError, match="at least 2 axes"):
        CODECS["lowrank32"].stored((100,))


@pytest.fixture
def auto_writer(tmp_path, sample_data_cfg):
    records, bad = load_records(sample_data_cfg)
    return CacheWriter(tmp_path / "cache", records, 4, bad, default_codec="auto")


def test_auto_defaults_come_from_the_bench_with_the_error_they_were_validated_at():
    assert AUTO_DEFAULTS["bound"] == 0.01 and "random weights" in AUTO_DEFAULTS["source"]
    for key, entry in AUTO_DEFAULTS["arrays"].items():
        assert AUTO_CODECS[key] == entry["codec"] in CODECS
        if CODECS[entry["codec"]].lossy:  # the bound the first shard is held to: where the head error hits 1%
            assert entry["max_rel_l2"] >= entry["rel_l2"] and max(entry["loss_rel"], entry["grad_rel"]) <= 0.01


def test_calibration_keeps_a_codec_within_the_bound_and_falls_back_above_it(auto_writer):
    w = auto_writer
    assert needs_calibration(w, "depth") and needs_calibration(w, "dino") and not needs_calibration(w, "sam")
    assert error_bound(w, "depth", "depth", None) == AUTO_DEFAULTS["arrays"]["depth/depth"]["max_rel_l2"]
    assert error_bound(w, "depth", "depth", 0.2) == 0.2  # cache.codec_max_error overrides
    rng = np.random.default_rng(3)
    depth = synthetic_shard_targets("depth", DEFAULT_DIMS["depth"], w.shard_records(0), 0)
    depth["depth"] = low_rank(rng, depth["depth"].shape, 4)  # compresses well
    dino = {"features": rng.standard_normal((4, 17, 32)).astype(np.float32)}
    codecs, calib = calibrate(w, "depth", depth)
    assert codecs["depth"] == AUTO_CODECS["depth/depth"] and calib["depth"]["fell_back_to"] is None
    codecs, calib = calibrate(w, "dino", dino, override=1e-6)  # bf16 factors err more than that
    assert codecs == {"features": "bf16"} and calib["features"]["codec"] == AUTO_CODECS["dino/features"]
    assert calib["features"]["rel_l2"] > 1e-6 and calib["features"]["samples"] == 4

    w.declare_anchor("dino", DEFAULT_DIMS["dino"], {}, [], codecs=codecs, calibration=calib)
    assert not needs_calibration(w, "dino")
    assert declared_choice(w, "dino") == (codecs, calib)  # a rerun declares the same thing
    for shard in range(w.num_shards):
        w.write_samples(shard)
        n = len(w.shard_records(shard))
        w.write_targets(shard, "dino", {"features": rng.standard_normal((n, 17, 32)).astype(np.float32)})
    arrays = w.finalize()["anchors"]["dino"]["arrays"]
    assert arrays["features"]["codec"] == "bf16" and arrays["features"]["calibration"]["fell_back_to"] == "bf16"
    assert Cache(w.cache_dir).targets(0, ["dino"])["dino"]["features"].shape == (17, 32)
