import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covt.images import open_rgb
from precompute.records import load_records
from shards.codecs import CODECS
from shards.reader import Cache, CacheError, StreamingDataset
from tests.synthetic import DEFAULT_DIMS, synthetic_targets, write_synthetic_cache


def indices_of(batch):
    return [s["index"] for s in batch]


def loader_indices(ds, workers, batch_size, limit=None):
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=indices_of)
    out = []
    for batch in dl:
        out.extend(batch)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_sample_holds_image_conversation_and_decoded_targets(synthetic_cache, sample_data_cfg):
    cache = Cache(synthetic_cache)
    records, _ = load_records(sample_data_cfg)
    rec = records[5]
    s = cache.sample(5)
    assert (s["index"], s["key"], s["id"]) == (5, "000000005", rec.id)
    assert s["conversations"] == rec.conversations
    assert s["image_bytes"] == [Path(rec.images[0]).read_bytes()]
    assert isinstance(s["images"][0], Image.Image) and s["images"][0].mode == "RGB"
    img = open_rgb(s["image_bytes"][0])
    for anchor in cache.anchors:
        want = synthetic_targets(anchor, DEFAULT_DIMS[anchor], img, 5, seed=0)
        for name, value in s["targets"][anchor].items():
            kind = cache.manifest["anchors"][anchor]["arrays"][name]["kind"]
            assert value.dtype == {"float": torch.float32, "mask": torch.bool, "count": torch.int64}[kind]
            assert tuple(value.shape) == np.shape(want[name]), (anchor, name)
            if kind == "float":  # bf16: 8 bits of mantissa
                np.testing.assert_allclose(value.numpy(), want[name], rtol=1 / 128, atol=1e-6)
            else:
                np.testing.assert_array_equal(value.numpy(), want[name])
    assert cache.sample(5, anchors=["pidinet"])["targets"].keys() == {"pidinet"}
    assert cache.dims("sam") == DEFAULT_DIMS["sam"]
    assert cache.decoders_dir == synthetic_cache / "decoders"


def test_resolve_takes_index_key_or_record_id(synthetic_cache):
    cache = Cache(synthetic_cache)
    assert cache.resolve(3) == cache.resolve("3") == cache.resolve("000000003") == 3
    assert cache.resolve("coffee") == next(i for i in range(7) if cache.sample_entry(i)["id"] == "coffee")
    with pytest.raises(CacheError, match="no-such-id"):
        cache.resolve("no-such-id")


def test_cache_errors_name_the_directory_and_problem(tmp_path, synthetic_cache):
    with pytest.raises(CacheError, match="not a shards cache"):
        Cache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "covt-shards/0"}))
    with pytest.raises(CacheError, match="covt-shards/0"):
        Cache(tmp_path)
    with pytest.raises(CacheError, match="anchor 'nope'"):
        StreamingDataset(synthetic_cache, anchors=["nope"])


@pytest.fixture(scope="module")
def six_cache(tmp_path_factory, repo_root):
    from covt.config import DataConfig

    cfg = DataConfig(path=str(repo_root / "data/sample/conversations.json"),
                     image_folder=str(repo_root / "data/sample/images"), limit=6)
    return write_synthetic_cache(tmp_path_factory.mktemp("six") / "cache", cfg, ["siglip"], shard_size=2)


def test_two_ranks_times_two_workers_read_every_sample_exactly_once(six_cache):
    for epoch_count in (1, 2):
        streams = []
        for rank in range(2):
            ds = StreamingDataset(six_cache, seed=3, rank=rank, world_size=2, batch_size=2, epochs=epoch_count)
            got = loader_indices(ds, workers=2, batch_size=2)
            stream = StreamingDataset(six_cache, seed=3, rank=rank, world_size=2, epochs=epoch_count)
            assert got == list(stream.indices())
            assert len(got) == len(ds) == 3 * epoch_count
            streams.append(got)
        for e in range(epoch_count):
            epoch = streams[0][3 * e:3 * e + 3] + streams[1][3 * e:3 * e + 3]
            assert sorted(epoch) == list(range(6))


def test_ranks_never_overlap_and_get_equal_shares_when_samples_do_not_divide(synthetic_cache):
    per_rank = [list(StreamingDataset(synthetic_cache, seed=1, rank=r, world_size=3, epochs=1).indices())
                for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 2]
    flat = sum(per_rank, [])
    assert len(set(flat)) == 6


def test_resuming_at_position_k_continues_the_uninterrupted_stream(synthetic_cache):
    full = list(StreamingDataset(synthetic_cache, seed=7, rank=1, world_size=2, epochs=3).indices())
    assert len(full) == 9
    for k in (0, 2, 4, 7):
        ds = StreamingDataset(synthetic_cache, seed=7, rank=1, world_size=2, start=k, batch_size=2, epochs=3)
        assert loader_indices(ds, workers=2, batch_size=2) == full[k:]
    # the infinite stream agrees with the finite one, and resumed samples carry the same content
    inf = StreamingDataset(synthetic_cache, seed=7, rank=1, world_size=2, start=5)
    first = next(iter(inf))
    assert first["index"] == full[5]
    reference = Cache(synthetic_cache).sample(full[5])
    assert first["id"] == reference["id"]
    assert torch.equal(first["targets"]["sam"]["masks"], reference["targets"]["sam"]["masks"])


def test_order_depends_on_seed_and_epoch_and_keeps_shard_locality(synthetic_cache):
    def stream(seed):
        return list(StreamingDataset(synthetic_cache, seed=seed, epochs=4).indices())

    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    epochs = [stream(0)[7 * e:7 * e + 7] for e in range(4)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    for e in epochs:  # samples of one shard come together
        shards = [i // 4 for i in e]
        assert sum(a != b for a, b in zip(shards, shards[1:], strict=False)) == 1
    assert list(StreamingDataset(synthetic_cache, shuffle=False, epochs=1).indices()) == list(range(7))


def test_packbits_and_float_codecs_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 7, 9)) > 0.5
    packbits = CODECS["packbits"]
    assert packbits.encode(masks)[""].shape == (3, 5, 8)
    np.testing.assert_array_equal(packbits.decode(packbits.encode(masks), (5, 7, 9)), masks)
    x = rng.normal(size=(4, 6, 10)).astype(np.float32) * np.array([1e-3, 1, 1e3, 0])[:, None, None].astype(np.float32)
    np.testing.assert_array_equal(CODECS["fp32"].decode(CODECS["fp32"].encode(x), (6, 10)), x)
    for name, rel in (("bf16", 2 ** -8), ("fp16", 2 ** -11), ("fp8", 2 ** -4)):
        codec = CODECS[name]
        xs = x[:2] if name == "fp16" else x  # 1e3 x N(0,1) may overflow fp16 (tested below)
        y = codec.decode(codec.encode(xs), (6, 10))
        peak = np.abs(xs).reshape(len(xs), -1).max(axis=1)[:, None, None]
        # plus the spacing of subnormals: fp8's relative to each sample's scale, fp16's absolute
        bound = rel * np.abs(xs) + {"bf16": 0.0, "fp16": 2.0 ** -24, "fp8": peak / 2 ** 9}[name]
        assert (np.abs(y - xs) <= bound).all(), name
    assert (CODECS["fp8"].decode(CODECS["fp8"].encode(x), (6, 10))[-1] == 0).all()  # all-zero sample: scale 1
    with pytest.raises(ValueError, match="fp16 cannot hold"):
        CODECS["fp16"].encode(np.full((1, 2), 1e5, np.float32))


def test_bf16_rounds_like_torch_and_measures_its_error():
    from shards.codecs import BLOCK

    rng = np.random.default_rng(1)
    n = BLOCK + 1000  # two blocks, the second partial
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[:64] = (bits[:64] & 0xFFFF0000) | 0x8000  # exact ties: half go up (odd), half stay (even)
    x[64:70] = [0.0, -0.0, 1e-40, -1e-42, 3.3e38, -3.3e38]  # zeros, subnormals, near the top of bf16
    batch = x.reshape(1, -1)
    codec = CODECS["bf16"]
    parts, error = codec.encode_measured(batch)
    want = torch.from_numpy(batch).to(torch.bfloat16)
    np.testing.assert_array_equal(parts[""], want.view(torch.int16).numpy().view(np.uint16))
    decoded = codec.decode(parts, (n,))
    np.testing.assert_array_equal(decoded, want.float().numpy())
    np.testing.assert_array_equal(codec.encode(batch)[""], parts[""])
    diff = decoded.astype(np.float64) - batch
    assert error["max_abs"] == np.abs(diff).max()
    assert error["sum_sq_err"] == pytest.approx((diff ** 2).sum(), rel=1e-5)
    assert error["sum_sq_ref"] == pytest.approx((batch.astype(np.float64) ** 2).sum(), rel=1e-5)
    with pytest.raises(ValueError, match="bf16 cannot hold values up to 3.4e"):
        codec.encode_measured(np.array([[1.0, 3.4e38]], np.float32))
    empty, err0 = codec.encode_measured(np.zeros((0, 3), np.float32))
    assert empty[""].shape == (0, 3) and err0 == {"max_abs": 0.0, "sum_sq_err": 0.0, "sum_sq_ref": 0.0}


@pytest.mark.parametrize("codec", ["fp8", "bf16"])
def test_lossy_codec_error_in_manifest_is_what_was_measured(tmp_path, sample_data_cfg, codec):
    cache_dir = write_synthetic_cache(tmp_path / "c", sample_data_cfg, ["dino"], shard_size=3,
                                      codecs={"dino/features": codec})
    cache = Cache(cache_dir)
    info = cache.manifest["anchors"]["dino"]["arrays"]["features"]
    assert info["codec"] == codec
    assert set(info["stored"]) == ({"features", "features.scale"} if codec == "fp8" else {"features"})
    errs, sq_err, sq_ref = [], 0.0, 0.0
    for i in range(cache.num_samples):
        s = cache.sample(i)
        want = synthetic_targets("dino", DEFAULT_DIMS["dino"], s["images"][0], i, 0)["features"].astype(np.float64)
        diff = s["targets"]["dino"]["features"].numpy().astype(np.float64) - want
        errs.append(np.abs(diff).max())
        sq_err, sq_ref = sq_err + (diff ** 2).sum(), sq_ref + (want ** 2).sum()
    assert info["measured_error"]["max_abs"] == pytest.approx(max(errs), rel=1e-6)
    assert info["measured_error"]["rel_l2"] == pytest.approx(np.sqrt(sq_err / sq_ref), rel=1e-6)
    assert 0 < info["measured_error"]["rel_l2"] < 0.1
