"""A cache at an S3 URL, against a real S3-compatible server (moto's server mode on 127.0.0.1) through s3fs."""
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from shards import layout, mirror, storage
from shards.reader import Cache, CacheError, StreamingDataset
from tests.synthetic import write_synthetic_cache

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
pytest.importorskip("moto.server", reason="moto's S3 server is not installed (pip install 'moto[server]')")
REPO = Path(__file__).resolve().parents[1]
ANCHORS = ["sam", "depth", "pidinet"]


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").mkdir("covt")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def s3():
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, sample_data_cfg_module):
    return write_synthetic_cache(tmp_path_factory.mktemp("local") / "cache", sample_data_cfg_module, ANCHORS,
                                 shard_size=3)


@pytest.fixture(scope="module")
def sample_data_cfg_module():
    from covt.config import DataConfig

    return DataConfig(path=str(REPO / "data/sample/conversations.json"), image_folder=str(REPO / "data/sample/images"))


@pytest.fixture(scope="module")
def s3_cache(s3_env, tmp_path_factory, sample_data_cfg_module):
    url = "s3://covt/full"
    write_synthetic_cache(url, sample_data_cfg_module, ANCHORS, shard_size=3,
                          staging=tmp_path_factory.mktemp("staging"))
    return url


def assert_same_samples(a: Cache, b: Cache) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        sa, sb = a.sample(i), b.sample(i)
        assert sa["image_bytes"] == sb["image_bytes"] and sa["conversations"] == sb["conversations"]
        for anchor in ANCHORS:
            for name, value in sa["targets"][anchor].items():
                assert torch.equal(value, sb["targets"][anchor][name]), (i, anchor, name)


def test_a_cache_written_to_s3_reads_back_like_the_local_one(s3_cache, local_cache, tmp_path):
    remote = Cache(s3_cache, local_dir=tmp_path / "copy")
    assert remote.remote and remote.manifest["shards"] == Cache(local_cache).manifest["shards"]
    assert_same_samples(Cache(local_cache), remote)
    assert (remote.decoders_dir).is_dir()


def data_bytes(folder: Path) -> int:
    """What the local copy's bound counts, read under its space lock like the processes that evict: data files,
    and the reserved size of downloads under way."""
    with contextlib.ExitStack() as held:
        for lock in folder.rglob(mirror.SPACE_LOCK):
            fcntl.flock(held.enter_context(open(lock)), fcntl.LOCK_EX)
        sizes = {}
        for path in folder.rglob("*"):
            if mirror.LOCKS_DIR in path.parts or not mirror.is_data(path.name):
                continue
            try:
                if path.name.endswith(mirror.PART_SUFFIX):  # a download lands under its target's name, same size
                    name, size, _ = mirror.parse_part(path.name)
                    sizes[path.with_name(name)] = size
                elif not path.name.startswith(".") and path.is_file():
                    sizes[path] = path.stat().st_size
            except FileNotFoundError:
                pass
        return sum(sizes.values())


def shard_bytes(cache: Cache, shard: int) -> int:
    return sum(cache.local_path(rel).stat().st_size for rel in cache.shard_files(shard) if mirror.is_data(rel))


def test_streaming_from_s3_prefetches_and_stays_within_its_bound(s3_cache, local_cache, tmp_path):
    local = list(StreamingDataset(local_cache, ANCHORS, seed=3, epochs=2))
    # room for the shard being read and the one the reader moves to, of three: prefetches that do not fit are
    # skipped, files are evicted behind the reader
    bound = 2 * max(shard_bytes(Cache(local_cache), s) for s in range(3))
    stream = StreamingDataset(s3_cache, ANCHORS, seed=3, epochs=2,
                              cache_kwargs={"local_dir": tmp_path / "copy", "local_max_bytes": bound})
    remote = []
    for sample in stream:
        remote.append(sample)
        assert data_bytes(tmp_path / "copy") <= bound
    assert [s["index"] for s in remote] == [s["index"] for s in local]
    assert all(torch.equal(a["targets"]["depth"]["features"], b["targets"]["depth"]["features"])
               for a, b in zip(local, remote))


@pytest.fixture(scope="module")
def s3_small_shards(s3_env, tmp_path_factory, sample_data_cfg_module):
    url = "s3://covt/small-shards"  # 7 shards of one sample: the workers of one rank read different shards
    # depth features of 512 kB a sample outweigh the photos (20-230 kB): shards of similar sizes
    dims = {"depth": {"layers": 4, "patches": 256, "dim": 256, "map_h": 32, "map_w": 32}}
    write_synthetic_cache(url, sample_data_cfg_module, ANCHORS, dims=dims, shard_size=1,
                          staging=tmp_path_factory.mktemp("staging"))
    return url


def test_the_loader_workers_of_a_rank_share_one_local_copy_within_its_bound(s3_small_shards, tmp_path):
    copy = tmp_path / "copy"
    first = Cache(s3_small_shards, local_dir=tmp_path / "sizes")
    sizes = sorted((shard_bytes(first, s) for s in range(first.num_shards)), reverse=True)
    # two workers, each reading one shard and moving to the next: room for the four largest shards, of seven
    bound = sum(sizes[:4])
    stream = StreamingDataset(s3_small_shards, ANCHORS, seed=1, epochs=3,
                              cache_kwargs={"local_dir": copy, "local_max_bytes": bound})
    expected = [stream.index_at(p) for p in range(len(stream))]
    peak, stop = [0], threading.Event()

    def watch():  # the bound holds at every moment, for both workers together
        while not stop.is_set():
            peak[0] = max(peak[0], data_bytes(copy))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        got = [int(s["index"]) for s in loader]
    finally:
        stop.set()
        watcher.join()
    assert got == expected
    assert 0 < peak[0] <= bound, (peak[0], bound)
    assert data_bytes(copy) <= bound < sum(sizes)  # files were evicted
    assert len(list(copy.glob("*/copy/*"))) == 1  # one local copy for both workers


def test_a_file_another_reader_holds_is_never_evicted_and_a_dead_download_is_cleared(s3_small_shards, tmp_path):
    sizes = Cache(s3_small_shards, local_dir=tmp_path / "sizes")
    shard = [shard_bytes(sizes, s) for s in range(sizes.num_shards)]
    bound = shard[0] + 2 * max(shard[1:])  # shard 0 held by one reader, two shards for the other
    assert bound < sum(shard)
    # two readers of one local copy (two processes in training: their file locks conflict the same way)
    a, b = (Cache(s3_small_shards, local_dir=tmp_path / "copy", local_max_bytes=bound) for _ in range(2))
    first = a.sample(0)
    tar0 = a.local_path(layout.tar_name(0))
    leftover = tar0.with_name(f".{Path(layout.tar_name(3)).name}.{10 * bound}.r.{'0' * 32}{mirror.PART_SUFFIX}")
    leftover.touch()  # a download whose process was killed: its reservation would fill the bound
    for index in range(1, b.num_samples):
        b.sample(index)
    assert not leftover.exists()
    again = a.sample(0)["targets"]["sam"]["embedding"]
    assert tar0.is_file() and torch.equal(again, first["targets"]["sam"]["embedding"])
    assert data_bytes(tmp_path / "copy") <= bound
    a.close()  # a moves on: shard 0 may go now
    for index in range(1, b.num_samples):
        b.sample(index)
    assert not tar0.exists()


def inspect(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "inspect", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env, "COVT_CACHE_LOCAL": ""})


def test_inspect_verify_reads_s3_and_names_a_flipped_byte(s3_env, s3_cache, tmp_path):
    ok = inspect(s3_cache, "--verify", "--local-dir", str(tmp_path / "copy"), env=s3_env)
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr
    fs = s3()
    url = "s3://covt/flipped"
    fs.copy("covt/full", "covt/flipped", recursive=True)
    tar = f"covt/flipped/{layout.tar_name(1)}"
    data = bytearray(fs.cat_file(tar))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(tar, bytes(data))
    bad = inspect(url, "--verify", env={**s3_env, "COVT_CACHE_LOCAL": str(tmp_path / "fresh")})
    assert bad.returncode == 1 and layout.tar_name(1) in bad.stdout, bad.stdout + bad.stderr


class Killed(Exception):
    pass


def test_a_killed_upload_leaves_nothing_a_reader_accepts_and_resumes(s3_env, s3_cache, sample_data_cfg_module,
                                                                     tmp_path, monkeypatch):
    url = "s3://covt/killed"
    real_put = storage.UploadingWriter.upload
    calls = {"n": 0}

    def dying_upload(self, rels):
        for rel in rels:
            calls["n"] += 1
            if calls["n"] == 9:  # a crash between a shard's data and its commit record
                raise Killed(rel)
            real_put(self, [rel])

    monkeypatch.setattr(storage.UploadingWriter, "upload", dying_upload)
    with pytest.raises(Killed):
        write_synthetic_cache(url, sample_data_cfg_module, ANCHORS, shard_size=3, staging=tmp_path / "staging")
    monkeypatch.setattr(storage.UploadingWriter, "upload", real_put)

    with pytest.raises(CacheError, match="no manifest.json"):
        Cache(url, local_dir=tmp_path / "copy")
    fs = s3()
    for record in fs.glob(f"covt/killed/{layout.PROGRESS_DIR}/shard-*.json"):  # no record without its data
        prog = json.loads(fs.cat_file(record))
        files = [prog["tar"]] if "tar" in prog else [st["file"] for a in prog["arrays"].values()
                                                      for st in a["stored"].values()]
        assert all(fs.exists(f"covt/killed/{f}") for f in files), record

    # resumed with the same staging folder, which holds the record the store never got
    write_synthetic_cache(url, sample_data_cfg_module, ANCHORS, shard_size=3, staging=tmp_path / "staging")
    done = Cache(url, local_dir=tmp_path / "copy2")
    full = Cache(s3_cache, local_dir=tmp_path / "copy3")
    assert done.manifest["shards"] == full.manifest["shards"]
    assert_same_samples(full, done)
    assert np.array_equal(done.stored("sam", "embedding")[:], full.stored("sam", "embedding")[:])


# ------------------------------------------------------------- one writer per bucket cache
def holder_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def remote_lock(url: str, pid: int) -> None:
    holder = {"host": socket.gethostname(), "pid": pid, "started": "2026-11-26T12:00:00Z", "job": f"other:{pid}"}
    s3().pipe_file(f"{url[len('s3://'):]}/{layout.LOCK}", json.dumps(holder).encode())


def tiny_config(url: str, *extra: str):
    from covt.config import load_config

    return load_config(REPO / "configs/tiny.yaml", [f"cache.dir={url}", "anchors=[pidinet]", "cache.shard_size=2",
                                                   f"data.path={REPO / 'data/sample/conversations.json'}",
                                                   f"data.image_folder={REPO / 'data/sample/images'}", *extra])


def test_the_lock_object_is_created_only_if_absent(s3_env):
    url = "s3://covt/locked"
    first, second = storage.RemoteLockFile(url), storage.RemoteLockFile(url)
    assert first.create({"job": "a"}) == {"job": "a"}
    assert second.create({"job": "b"}) == {"job": "a"}  # S3's conditional write: the second sees the first
    first.remove()
    assert second.read() is None


def test_a_second_precompute_into_the_same_bucket_cache_stops_naming_the_holder(s3_env, tmp_path):
    from precompute.run import precompute
    from shards.lock import CacheBusyError

    url = "s3://covt/busy"
    other = holder_process()
    try:
        remote_lock(url, other.pid)
        with pytest.raises(CacheBusyError, match=rf"pid {other.pid}.*one precompute per cache.*{url}/writer.lock"):
            precompute(tiny_config(url, f"cache.local_dir={tmp_path}"))
        assert not s3().exists(f"covt/busy/{layout.PROGRESS_DIR}")  # nothing was written
        with pytest.raises(CacheError, match=rf"precompute is running: precompute on host .* \(pid {other.pid}"):
            Cache(url, local_dir=tmp_path)
    finally:
        other.kill()
        other.wait()


def test_precompute_into_s3_with_a_validation_cache_that_training_reads(s3_env, tmp_path):
    from precompute.run import precompute
    from trainer.validation import load_validation

    url = "s3://covt/precomputed"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    remote_lock(url, dead.pid)  # a killed run's lock: taken over
    cfg = tiny_config(url, f"cache.local_dir={tmp_path / 'local'}", "data.validation=2")
    precompute(cfg)
    assert not s3().exists(f"covt/precomputed/{layout.LOCK}")  # released
    assert Cache(url, local_dir=tmp_path / "read").num_samples == 5
    held_out = load_validation(cfg)
    assert len(held_out) == 2 and held_out[0]["targets"]["pidinet"]["edges"].ndim >= 2
    ok = inspect(f"{url}/validation", "--verify", "--local-dir", str(tmp_path / "v"), env=s3_env)
    assert ok.returncode == 0 and "verify: OK (2 samples" in ok.stdout, ok.stdout + ok.stderr
    missing = tiny_config("s3://covt/never-written", "data.validation=2")
    with pytest.raises(FileNotFoundError, match="s3://covt/never-written/validation holds no finished cache"):
        load_validation(missing)


# ------------------------------------------------------------------ issue 23
def test_verify_checks_what_the_bucket_holds_now_not_an_older_local_copy(s3_env, s3_cache, tmp_path):
    fs = s3()
    url = "s3://covt/changed"
    fs.copy("covt/full", "covt/changed", recursive=True)
    copy = tmp_path / "copy"
    ok = inspect(url, "--verify", "--local-dir", str(copy), env=s3_env)
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr
    Cache(url, local_dir=copy).sample(0)  # a reader's local copy of the good bytes, kept
    tar = f"covt/changed/{layout.tar_name(1)}"
    data = bytearray(fs.cat_file(tar))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(tar, bytes(data))
    fs.rm_file(f"covt/changed/{layout.tar_name(0)}")
    for local in (["--local-dir", str(copy)], []):  # the copy that holds the good bytes, the default one
        bad = inspect(url, "--verify", *local, env=s3_env)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        problems = [line for line in bad.stdout.splitlines() if line.startswith("PROBLEM")]
        assert any(layout.tar_name(1) in p for p in problems) and any(layout.tar_name(0) in p for p in problems)
    assert not list(copy.rglob("covt-verify-*"))  # the fresh copy is removed


def test_a_dead_precompute_s_bucket_lock_is_shown_as_stale(s3_env, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    url = "s3://covt/stale-lock"
    remote_lock(url, dead.pid)
    with pytest.raises(CacheError, match=rf"precompute stopped before it finished: precompute on host .* "
                                         rf"\(pid {dead.pid}, .* is no longer running .* stale; rerun it"):
        Cache(url, local_dir=tmp_path)
