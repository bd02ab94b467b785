import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from precompute.records import load_records
from shards.writer import CacheMismatchError, CacheWriter
from tests.synthetic import DEFAULT_DIMS, synthetic_shard_targets, write_synthetic_cache

ANCHORS = ["sam", "depth", "pidinet"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path):
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    differing = [k for k in ta if ta[k] != tb[k]]
    assert not differing, differing


class Crash(Exception):
    pass


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import zarr
from covt.config import DataConfig
from tests.synthetic import write_synthetic_cache

cache, data, images, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = 0
original = zarr.Array.__setitem__

def setitem(self, selection, value):
    global calls
    original(self, selection, value)
    calls += 1
    if calls == kill_at:
        # a crash in the middle of writing a zarr shard leaves a half file behind
        newest = max((p for p in Path(cache, "targets.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"),
                     key=lambda p: p.stat().st_mtime_ns)
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)

zarr.Array.__setitem__ = setitem
write_synthetic_cache(cache, DataConfig(path=data, image_folder=images), %r, shard_size=3)
"""


def test_interrupted_then_resumed_write_equals_uninterrupted_byte_for_byte(tmp_path, sample_data_cfg, monkeypatch):
    clean = write_synthetic_cache(tmp_path / "clean", sample_data_cfg, ANCHORS, shard_size=3)
    resumed = tmp_path / "resumed"

    # 1) an exception half way through the second tar shard
    calls = {"n": 0}
    original_addfile = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # shard 0 has 3 samples x 2 members; this is inside shard 1
            raise Crash("simulated crash while writing a tar")
        return original_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    with pytest.raises(Crash):
        write_synthetic_cache(resumed, sample_data_cfg, ANCHORS, shard_size=3)
    monkeypatch.setattr(tarfile.TarFile, "addfile", original_addfile)
    assert (resumed / "samples" / "shard-000001.tar.partial").exists()
    assert not (resumed / "progress" / "shard-000001.samples.json").exists()

    # 2) a real SIGKILL while writing shard 1's SAM targets (2nd zarr write of the rerun: shard 0 is done),
    #    leaving a truncated zarr shard file
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT % ANCHORS, str(resumed), sample_data_cfg.path,
                           sample_data_cfg.image_folder, "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (resumed / "progress" / "shard-000001.samples.json").exists()
    assert not (resumed / "progress" / "shard-000001.sam.json").exists()
    assert not (resumed / "manifest.json").exists()

    # 3) a tar that lost its commit record is not trusted: it is rewritten
    (resumed / "progress" / "shard-000000.samples.json").unlink()
    tar0 = resumed / "samples" / "shard-000000.tar"
    tar0.write_bytes(tar0.read_bytes()[:1000])

    write_synthetic_cache(resumed, sample_data_cfg, ANCHORS, shard_size=3)
    assert_same_tree(clean, resumed)
    assert json.loads((clean / "manifest.json").read_text()) == json.loads((resumed / "manifest.json").read_text())


def test_adding_an_anchor_later_touches_neither_images_nor_other_anchors(tmp_path, sample_data_cfg):
    at_once = write_synthetic_cache(tmp_path / "once", sample_data_cfg, ["sam", "pidinet"], shard_size=4)
    later = write_synthetic_cache(tmp_path / "later", sample_data_cfg, ["sam"], shard_size=4)
    before = {k: v for k, v in tree_bytes(later).items() if k.startswith(("samples/", "targets.zarr/sam/"))}
    mtimes = {k: (later / k).stat().st_mtime_ns for k in before}
    write_synthetic_cache(later, sample_data_cfg, ["pidinet"], shard_size=4)
    after = tree_bytes(later)
    assert all(after[k] == v and (later / k).stat().st_mtime_ns == mtimes[k] for k, v in before.items())
    manifest = json.loads((later / "manifest.json").read_text())
    assert sorted(manifest["anchors"]) == ["pidinet", "sam"]
    assert_same_tree(at_once, later)


@pytest.fixture
def writer(tmp_path, sample_data_cfg):
    records, bad = load_records(sample_data_cfg)
    return CacheWriter(tmp_path / "cache", records, 3, bad)


def test_shards_split_records_and_ranks_disjointly(writer):
    assert writer.num_shards == 3
    assert [len(writer.shard_records(s)) for s in range(3)] == [3, 3, 1]
    assert writer.shards_for_rank(0, 2) == [0, 2] and writer.shards_for_rank(1, 2) == [1]
    assert writer.decoders_dir.is_dir()


def test_declare_anchor_is_idempotent_and_rejects_a_changed_anchor(writer):
    dims = DEFAULT_DIMS["pidinet"]
    writer.declare_anchor("pidinet", dims, {"sha256": "a"}, [])
    writer.declare_anchor("pidinet", dims, {"sha256": "a"}, [])  # again: fine (another rank)
    with pytest.raises(CacheMismatchError, match=r"pidinet.*dims"):
        writer.declare_anchor("pidinet", {"map_h": 16, "map_w": 16}, {"sha256": "a"}, [])
    with pytest.raises(CacheMismatchError, match=r"pidinet.*fingerprint"):
        writer.declare_anchor("pidinet", dims, {"sha256": "b"}, [])
    writer.write_samples(0)
    writer.write_targets(0, "pidinet", synthetic_shard_targets("pidinet", dims, writer.shard_records(0), 0))
    assert writer.shard_done(0, "pidinet")
    writer.declare_anchor("pidinet", {"map_h": 16, "map_w": 16}, {"sha256": "b"}, [], overwrite=True)
    assert not writer.shard_done(0, "pidinet")
    assert writer.shard_done(0)  # the images are untouched
    # a second writer object (another rank, or a later run) sees the new declaration
    other = CacheWriter(writer.cache_dir, writer.records, 3, writer.bad_records)
    other.declare_anchor("pidinet", {"map_h": 16, "map_w": 16}, {"sha256": "b"}, [])


def test_declare_anchor_names_missing_dims_and_decoder_files(writer):
    with pytest.raises(ValueError, match=r"'sam'.*max_masks"):
        writer.declare_anchor("sam", {"embed_dim": 4, "embed_h": 2, "embed_w": 2}, {}, [])
    with pytest.raises(FileNotFoundError, match="prompt_decoder.pt"):
        writer.declare_anchor("pidinet", DEFAULT_DIMS["pidinet"], {}, ["prompt_decoder.pt"])


def test_write_targets_rejects_wrong_shapes_and_dtypes_naming_the_array(writer):
    dims = DEFAULT_DIMS["sam"]
    writer.declare_anchor("sam", dims, {}, [])
    good = synthetic_shard_targets("sam", dims, writer.shard_records(2), 0)
    with pytest.raises(ValueError, match=r"shard 2.*sam/masks has shape"):
        writer.write_targets(2, "sam", {**good, "masks": good["masks"][:, :4]})
    with pytest.raises(ValueError, match=r"sam/masks has dtype float32"):
        writer.write_targets(2, "sam", {**good, "masks": good["masks"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"do not match"):
        writer.write_targets(2, "sam", {k: v for k, v in good.items() if k != "mask_count"})
    bad = good["embedding"].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=rf"sam/embedding has NaN.*id '{writer.shard_records(2)[0].id}'"):
        writer.write_targets(2, "sam", {**good, "embedding": bad})
    with pytest.raises(KeyError, match="not declared"):
        writer.write_targets(2, "dino", {})


def test_finalize_names_the_shards_still_missing(writer):
    writer.declare_anchor("pidinet", DEFAULT_DIMS["pidinet"], {}, [])
    for s in range(3):
        writer.write_samples(s)
    writer.write_targets(0, "pidinet", synthetic_shard_targets("pidinet", DEFAULT_DIMS["pidinet"],
                                                               writer.shard_records(0), 0))
    with pytest.raises(RuntimeError, match=r"'pidinet'.*shards \[1, 2\]"):
        writer.finalize()
    (writer.cache_dir / "progress" / "shard-000001.samples.json").unlink()
    with pytest.raises(RuntimeError, match=r"sample tars.*\[1\]"):
        writer.finalize()


def test_a_cache_refuses_records_of_another_dataset(writer, sample_data_cfg):
    records, bad = load_records(sample_data_cfg)
    with pytest.raises(CacheMismatchError, match="records_sha256"):
        CacheWriter(writer.cache_dir, records[:-1], 3, bad)
    with pytest.raises(CacheMismatchError, match="shard_size"):
        CacheWriter(writer.cache_dir, records, 4, bad)


def test_tar_shards_hold_original_bytes_and_read_as_webdataset(synthetic_cache, sample_data_cfg):
    import webdataset as wds

    records, _ = load_records(sample_data_cfg)
    seen = {}
    for tar in sorted((synthetic_cache / "samples").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            seen[s["__key__"]] = s
    assert sorted(seen) == [f"{r.index:09d}" for r in records]
    for r in records:
        s = seen[f"{r.index:09d}"]
        meta = json.loads(s["json"])
        assert (meta["id"], meta["index"], meta["source_index"]) == (r.id, r.index, r.source_index)
        assert meta["conversations"] == r.conversations
        assert s["img0.jpg"] == Path(r.images[0]).read_bytes()


def zarr_compressors(cache: Path, anchor: str, array: str) -> list[dict]:
    meta = json.loads((cache / "targets.zarr" / anchor / array / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    return [c for c in sharding["configuration"]["codecs"] if c["name"] != "bytes"]


def test_compression_per_kind_is_recorded_and_reads_back_the_same_values(tmp_path, sample_data_cfg):
    from shards.inspect import summary
    from shards.reader import Cache

    plain = write_synthetic_cache(tmp_path / "plain", sample_data_cfg, ["sam"], shard_size=4)
    records, bad = load_records(sample_data_cfg)
    zstd = tmp_path / "zstd"
    writer = CacheWriter(zstd, records, 4, bad, compression={"float": "zstd-1"})
    writer.declare_anchor("sam", DEFAULT_DIMS["sam"], {"synthetic": True, "seed": 0}, [])
    for s in range(writer.num_shards):
        writer.write_samples(s)
        writer.write_targets(s, "sam", synthetic_shard_targets("sam", DEFAULT_DIMS["sam"], writer.shard_records(s), 0))
    writer.finalize()

    arrays = {c: json.loads((c / "manifest.json").read_text())["anchors"]["sam"]["arrays"] for c in (plain, zstd)}
    assert {k: v["compression"] for k, v in arrays[plain].items()} == {
        "embedding": "none", "masks": "zstd-3", "mask_count": "zstd-3"}
    assert arrays[zstd]["embedding"]["compression"] == "zstd-1"
    assert zarr_compressors(plain, "sam", "embedding") == []
    compressors = zarr_compressors(zstd, "sam", "embedding")
    assert [(c["name"], c["configuration"]["level"]) for c in compressors] == [("zstd", 1)]
    assert [(c["name"], c["configuration"]["level"]) for c in zarr_compressors(plain, "sam", "masks")] == [("zstd", 3)]
    a, b = Cache(plain), Cache(zstd)
    assert re.search(r"^sam\s+embedding .* none$", summary(a), re.M)
    assert re.search(r"^sam\s+masks .* zstd-3$", summary(a), re.M)
    assert re.search(r"^sam\s+embedding .* zstd-1$", summary(b), re.M)
    for i in range(a.num_samples):
        for name, value in a.targets(i)["sam"].items():
            assert torch_equal(value, b.targets(i)["sam"][name]), (i, name)
    # the same records with other compression are another cache, not a resumable one
    with pytest.raises(CacheMismatchError, match=r"'sam'.*arrays"):
        CacheWriter(plain, records, 4, bad, compression={"float": "zstd-1"}).declare_anchor(
            "sam", DEFAULT_DIMS["sam"], {"synthetic": True, "seed": 0}, [])


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def test_unknown_compression_is_an_error_naming_it(tmp_path, sample_data_cfg):
    from shards.codecs import CodecError

    records, bad = load_records(sample_data_cfg)
    with pytest.raises(CodecError, match=r"compression\['float'\].*'lz4'"):
        CacheWriter(tmp_path / "a", records, 3, bad, compression={"float": "lz4"})
    with pytest.raises(CodecError, match=r"'features'.*not kinds"):
        CacheWriter(tmp_path / "b", records, 3, bad, compression={"features": "none"})


@pytest.mark.parametrize("compression", ["none", "zstd-1"])
def test_verify_names_the_sample_of_a_flipped_byte_in_a_zarr_shard_of_either_compression(
        tmp_path, sample_data_cfg, compression):
    from shards.inspect import verify
    from shards.reader import Cache

    records, bad = load_records(sample_data_cfg)
    cache = tmp_path / "c"
    writer = CacheWriter(cache, records, 4, bad, compression={"float": compression})
    writer.declare_anchor("dino", DEFAULT_DIMS["dino"], {}, [])
    for s in range(writer.num_shards):
        writer.write_samples(s)
        targets = synthetic_shard_targets("dino", DEFAULT_DIMS["dino"], writer.shard_records(s), 0)
        writer.write_targets(s, "dino", targets)
    writer.finalize()
    assert verify(Cache(cache), show_progress=False) == []
    shard_file = cache / "targets.zarr/dino/features/c/1/0/0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0x01  # inside the first chunk of shard 1: sample 4
    shard_file.write_bytes(bytes(data))
    problems = verify(Cache(cache), show_progress=False)
    assert any("targets.zarr/dino/features/c/1/0/0" in p and "checksum mismatch" in p and "000000004" not in p
               for p in problems), problems
    assert any("000000004" in p and "dino/features" in p for p in problems), problems
    assert not any("000000005" in p or "shard-000000" in p or "c/0/0/0" in p for p in problems), problems


def test_anchors_written_from_threads_give_the_same_bytes_as_one_at_a_time(tmp_path, sample_data_cfg):
    from concurrent.futures import ThreadPoolExecutor

    anchors = ["sam", "depth", "dino", "pidinet"]
    sequential = write_synthetic_cache(tmp_path / "seq", sample_data_cfg, anchors, shard_size=3)
    records, bad = load_records(sample_data_cfg)
    writer = CacheWriter(tmp_path / "threads", records, 3, bad)
    for a in anchors:
        writer.declare_anchor(a, DEFAULT_DIMS[a], {"synthetic": True, "seed": 0}, [])
    jobs = []
    for s in range(writer.num_shards):
        writer.write_samples(s)
        jobs += [(s, a, synthetic_shard_targets(a, DEFAULT_DIMS[a], writer.shard_records(s), 0)) for a in anchors]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(writer.write_targets, *job) for job in jobs]:
            f.result()
    writer.finalize()
    assert_same_tree(sequential, tmp_path / "threads")


def test_a_writer_refuses_a_cache_of_another_schema(writer):
    meta_path = writer.cache_dir / "targets.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema"] = "covt-shards/1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match=r"covt-shards/1.*covt-shards/2.*new cache.dir"):
        CacheWriter(writer.cache_dir, writer.records, 3, writer.bad_records)


def test_target_checksums_hash_an_arrays_bytes_in_c_order():
    import google_crc32c

    from shards import layout

    a = np.arange(24, dtype=np.uint16).reshape(4, 6)
    assert layout.checksum(a) == layout.checksum(a.tobytes()) == f"{google_crc32c.value(a.tobytes()):08x}"
    assert layout.checksum(a.T) == layout.checksum(np.ascontiguousarray(a.T).tobytes())
    assert layout.checksum(a[1]) != layout.checksum(a[2])
    assert layout.checksum(a, "sha256") == layout.sha256_bytes(a.tobytes())
    with pytest.raises(ValueError, match="md5"):
        layout.checksum(a, "md5")
