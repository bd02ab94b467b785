"""Issue 13: every way things break ends in a named error or an exact recovery.

Corruptions are made by the tests on copies of the synthetic cache (tests/conftest.py); kills are real
signals; a full disk is an OSError(ENOSPC) injected at the write layer (no filesystem can be filled here).
The slow cases run the tiny trainer end to end.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covt import fs
from covt.config import DataConfig, load_config
from precompute.records import BadRecordError, load_records
from shards import layout
from shards.inspect import main as inspect_main
from shards.integrity import DamagedSampleError
from shards.lock import CacheBusyError, CacheLock
from shards.reader import Cache, CacheError, StreamingDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, synthetic_cache):
    return Path(shutil.copytree(synthetic_cache, tmp_path / "cache"))


def entry_of(cache_dir: Path, index: int, shard_size: int = 4) -> dict:
    prog = json.loads((cache_dir / layout.samples_progress_name(index // shard_size)).read_text())
    return prog["samples"][index % shard_size]


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def stored_file(cache_dir: Path, shard: int, anchor: str, array: str, stored: str) -> Path:
    prog = json.loads((cache_dir / layout.targets_progress_name(shard, anchor)).read_text())
    return cache_dir / prog["arrays"][array]["stored"][stored]["file"]


def verify_problems(capsys, cache_dir) -> list[str]:
    code = inspect_main([str(cache_dir), "--verify"])
    out = capsys.readouterr().out
    assert code == 1, out
    return [line for line in out.splitlines() if line.startswith("PROBLEM")]


# ------------------------------------------------------------------ integrity on read
@pytest.mark.parametrize("member", [0, 1], ids=["conversation", "image"])
def test_a_flipped_byte_in_a_tar_member_is_a_named_error_when_read(cache, member):
    victim = entry_of(cache, 5)
    mem = victim["members"][member]
    flip(cache / layout.tar_name(1), mem["offset"] + mem["size"] // 2)
    c = Cache(cache)
    with pytest.raises(DamagedSampleError) as e:
        c.sample(5)
    assert "samples/shard-000001.tar" in str(e.value) and "000000005" in str(e.value)
    assert f"checksum mismatch in {mem['name']}" in str(e.value)
    c.sample(4)  # its neighbours read fine


def test_a_flipped_exponent_bit_in_a_depth_target_is_a_named_error(cache):
    path = stored_file(cache, 1, "depth", "depth", "depth")
    flip(path, 1, 0x40)  # bf16, little endian: byte 1 of the first value of sample 4 holds the exponent
    with pytest.raises(DamagedSampleError, match=r"000000004 .*depth/depth: checksum mismatch"):
        Cache(cache).sample(4)
    assert Cache(cache).sample(5)["targets"]["depth"]["depth"].isfinite().all()


def test_a_deleted_zarr_shard_file_is_an_error_never_fill_values(cache):
    path = stored_file(cache, 0, "depth", "depth", "depth")
    path.unlink()
    with pytest.raises(DamagedSampleError, match=r"depth/depth: zarr shard file missing"):
        Cache(cache).sample(2)
    assert not Cache(cache, verify=False).sample(2)["targets"]["depth"]["depth"].any()  # what zarr would give


def test_an_edited_commit_record_is_a_named_error(cache):
    path = cache / layout.targets_progress_name(1, "dino")
    path.write_text(path.read_text().replace('"count"', '"count" ', 1))
    with pytest.raises(DamagedSampleError, match=r"shard-000001.dino.json: commit record of shard 1 differs"):
        Cache(cache).sample(4)


def test_the_stream_stops_at_a_damaged_sample_naming_it_and_what_to_do(cache):
    victim = entry_of(cache, 6)
    flip(cache / layout.tar_name(1), victim["members"][1]["offset"] + 10)
    ds = StreamingDataset(cache, ["depth"], seed=0, epochs=1, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list)
    with pytest.raises(DamagedSampleError) as e:  # raised in a DataLoader worker, re-raised here
        list(loader)
    for needle in ("000000006", "samples/shard-000001.tar", victim["members"][1]["name"], "--verify",
                   "train.on_damaged_sample=skip"):
        assert needle in str(e.value), needle


def test_skip_mode_fills_the_slot_with_the_next_sample_and_says_what_it_skipped(cache, caplog):
    caplog.set_level("DEBUG", logger="shards.reader")  # the stream says it at debug level; the trainer warns, once
    flip(cache / layout.tar_name(0), entry_of(cache, 2)["members"][1]["offset"] + 10)
    ds = StreamingDataset(cache, ["depth"], seed=0, epochs=1, shuffle=False, on_damaged="skip")
    samples = list(ds)
    assert [s["index"] for s in samples] == [0, 1, 3, 3, 4, 5, 6]  # same length: batches and resume stay put
    assert [len(s["damaged_skipped"]) for s in samples] == [0, 0, 1, 0, 0, 0, 0]
    assert "000000002" in samples[2]["damaged_skipped"][0]
    assert any("skipping damaged sample" in r.getMessage() and "000000002" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- manifest
@pytest.mark.parametrize("edit", ["max_masks", "checkpoint hash"])
def test_an_edited_manifest_is_reported_by_verify_and_refused_by_the_reader(cache, capsys, edit):
    manifest = json.loads((cache / layout.MANIFEST).read_text())
    if edit == "max_masks":
        manifest["anchors"]["sam"]["dims"]["max_masks"] = 4
    else:
        manifest["anchors"]["depth"]["fingerprint"]["checkpoint_sha256"] = "0" * 64
    (cache / layout.MANIFEST).write_text(layout.dumps(manifest))
    problems = verify_problems(capsys, cache)
    assert any("manifest.json was edited" in p for p in problems), problems
    with pytest.raises(CacheError, match="manifest.json was edited"):
        Cache(cache)


# ------------------------------------------------------------------------ config
def test_a_bad_number_stops_the_trainer_before_any_model_loads(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "trainer", "--config", "configs/tiny.yaml", "train.grad_accum=0",
           f"model.path={tmp_path / 'never-built'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config error: train.grad_accum: 0 is out of range (must be >= 1)" in proc.stderr
    assert not (tmp_path / "never-built").exists()


# -------------------------------------------------------------------------- lock
def holder_process():
    """A live process on this host holding the lock for as long as the test needs."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def write_lock(cache_dir: Path, pid: int) -> None:
    (cache_dir / layout.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                     "started": "2026-11-26T12:00:00Z", "job": f"other:{pid}"}))


def test_a_second_precompute_on_a_cache_stops_naming_the_holder(tmp_path):
    from precompute.run import precompute

    other = holder_process()
    try:
        (tmp_path / "cache").mkdir()
        write_lock(tmp_path / "cache", other.pid)
        cfg = load_config(REPO / "configs/tiny.yaml", [f"cache.dir={tmp_path / 'cache'}", "anchors=[pidinet]",
                                                       f"data.path={REPO / 'data/sample/conversations.json'}",
                                                       f"data.image_folder={REPO / 'data/sample/images'}"])
        with pytest.raises(CacheBusyError, match=rf"pid {other.pid}.*one precompute per cache"):
            precompute(cfg)
        assert not (tmp_path / "cache" / layout.PROGRESS_DIR).exists()  # nothing was written
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "cache").mkdir()
    write_lock(tmp_path / "cache", dead.pid)
    with CacheLock(tmp_path / "cache") as lock:
        assert json.loads((tmp_path / "cache" / layout.LOCK).read_text())["pid"] == os.getpid() and lock.owner
    assert not (tmp_path / "cache" / layout.LOCK).exists()


def test_a_trainer_on_an_unfinished_cache_says_precompute_is_running_or_unfinished(cache):
    (cache / layout.MANIFEST).unlink()
    with pytest.raises(CacheError, match=r"precompute has not finished: rerun it .*python -m precompute"):
        Cache(cache)
    other = holder_process()
    try:
        write_lock(cache, other.pid)
        with pytest.raises(CacheError, match=rf"precompute is running: precompute on host .* \(pid {other.pid}"):
            Cache(cache)
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------------- disk full
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_precompute_writes_names_the_file_and_rerunning_resumes(tmp_path, monkeypatch, capsys):
    import zarr

    from tests.synthetic import write_synthetic_cache

    data = DataConfig(path=str(REPO / "data/sample/conversations.json"),
                      image_folder=str(REPO / "data/sample/images"), on_bad_record="error")
    with monkeypatch.context() as m:
        m.setattr(zarr.Array, "__setitem__", enospc)
        with pytest.raises(fs.DiskFullError) as e:
            write_synthetic_cache(tmp_path / "cache", data, ["depth"], shard_size=4)
    message = str(e.value)
    assert "disk full" in message and "targets.zarr/depth/" in message and "rerun the same command" in message
    assert "precompute resumes" in message
    with monkeypatch.context() as m:
        m.setattr("tarfile.TarFile.addfile", enospc)
        with pytest.raises(fs.DiskFullError, match=r"disk full: .*samples/shard-000001.tar"):
            write_synthetic_cache(tmp_path / "cache", data, ["depth"], shard_size=4)
    write_synthetic_cache(tmp_path / "cache", data, ["depth"], shard_size=4)  # space is back: it resumes
    assert inspect_main([str(tmp_path / "cache"), "--verify"]) == 0, capsys.readouterr().out


def test_disk_full_during_a_checkpoint_names_the_folder(tmp_path, monkeypatch):
    from trainer import checkpoint

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(checkpoint, "save_file", enospc)
    with pytest.raises(fs.DiskFullError, match=r"disk full: .*checkpoints/.tmp-step-000003 .*resumes from the "
                                                   r"last complete checkpoint"):
        checkpoint.save_checkpoint(tmp_path, 3, model, meta={})
    assert checkpoint.latest_checkpoint(tmp_path) is None


def test_a_failed_write_with_no_space_left_counts_as_disk_full(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('unexpected pos ...') without an errno."""
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: SimpleNamespace(free=4096))
    with pytest.raises(fs.DiskFullError, match="disk full"):
        with fs.naming_disk_full(tmp_path / "x.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: SimpleNamespace(free=5 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: not a full disk, the error as it was
        with fs.naming_disk_full(tmp_path / "x.pt"):
            raise RuntimeError("unexpected pos 64 vs 0")


def test_disk_full_during_a_merge_or_export_names_the_folder_and_leaves_no_temporary(tmp_path):
    from trainer.export import write_atomically

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"x")
        enospc()

    with pytest.raises(fs.DiskFullError, match=r"disk full: .*lora_stage1_merged .*training resumes"):
        write_atomically(tmp_path / "lora_stage1_merged", write)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------- leftovers, non-finite
def test_temporary_folders_of_interrupted_merges_exports_and_checkpoints_are_removed(tmp_path):
    from trainer.export import remove_interrupted_writes

    leftovers = [tmp_path / ".tmp-lora_stage1_merged.k2j3", tmp_path / ".tmp-final.x1",
                 tmp_path / "checkpoints" / ".tmp-step-000004"]
    for d in leftovers:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / "step-000002").mkdir()
    assert sorted(remove_interrupted_writes(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "step-000002"]


def test_export_refuses_non_finite_heads_and_writes_nothing(tmp_path, synthetic_cache):
    from trainer.export import NonFiniteTensorError, export_final
    from trainer.heads import build_heads

    heads = build_heads(["depth", "dino"], 32, Cache(synthetic_cache))
    with torch.no_grad():
        next(heads["dino"].parameters())[0] = float("nan")
    (tmp_path / "merged").mkdir()
    with pytest.raises(NonFiniteTensorError, match=r"not writing the heads of .*final: 1 of \d+ tensors hold "
                                                   r"NaN/inf \(dino\."):
        export_final(tmp_path / "merged", heads, None, {}, tmp_path / "final")
    assert not (tmp_path / "final").exists()


# ------------------------------------------------------------------------ records
def test_jsonl_data_is_read_and_a_bad_line_is_a_bad_record_named_by_its_line(tmp_path):
    entries = json.loads((REPO / "data/sample/conversations.json").read_text())
    lines = [json.dumps(e) for e in entries[:3]] + ['{"id": "cut", "image": "chelsea.jpg", "conv'] + \
        [""] + [json.dumps(e) for e in entries[3:]]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(path), image_folder=str(REPO / "data/sample/images"), on_bad_record="skip")
    records, bad = load_records(cfg)
    assert [r.id for r in records] == [str(e["id"]) for e in entries]
    assert [(b.id, b.kind) for b in bad] == [("line 4", "bad_json")]
    assert "line 4 is not valid JSON" in bad[0].reason
    cfg.on_bad_record = "error"
    with pytest.raises(BadRecordError, match=r"line 4 is not valid JSON"):
        load_records(cfg)


# ---------------------------------------------------------------- the tiny trainer
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A cache with synthetic depth targets (4 samples per shard) and a path for the tiny base model."""
    from tests.synthetic import write_synthetic_cache

    root = tmp_path_factory.mktemp("faults")
    data = DataConfig(path=str(REPO / "data/sample/conversations.json"),
                      image_folder=str(REPO / "data/sample/images"), on_bad_record="error")
    write_synthetic_cache(root / "cache", data, ["depth"], shard_size=4)
    return root


def overrides(workdir: Path, output: str, steps: int, *extra: str, cache: str = "cache") -> list[str]:
    return [f"model.path={workdir / 'base'}", f"cache.dir={workdir / cache}", f"train.output_dir={workdir / output}",
            "anchors=[depth]", f"train.stages=[{{name: understanding, steps: {steps}, merge_after: true}}]",
            "train.save_every=2", "train.lr=5e-3", "train.projection_lr=5e-3", *extra]


def tiny(workdir: Path, output: str, steps: int, *extra: str, cache: str = "cache"):
    return load_config(REPO / "configs/tiny.yaml", overrides(workdir, output, steps, *extra, cache=cache))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    # perf/* (seconds per step, samples/s) are timings: they differ between any two runs
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith("perf/")}


def nan_depth_loss(monkeypatch, at_calls: set[int]) -> None:
    """The depth head's loss turns NaN at the given calls (one call per optimizer step here)."""
    from trainer.heads.depth import DepthHead

    real, calls = DepthHead.row_losses, [0]

    def row_losses(self, prediction, targets):
        calls[0] += 1
        value = real(self, prediction, targets)
        return value * float("nan") if calls[0] in at_calls else value

    monkeypatch.setattr(DepthHead, "row_losses", row_losses)


@pytest.mark.slow
def test_kill_9_then_resume_logs_exactly_what_an_uninterrupted_run_logs(workdir):
    from trainer.train import train

    assert train(tiny(workdir, "full", 5)) is not None
    killed = workdir / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", "configs/tiny.yaml",
                             *overrides(workdir, "killed", 5)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((killed / "metrics.jsonl").is_file() and len(metrics(killed)) >= 3):  # checkpoint at 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(metrics(killed)) > 2  # more than the checkpoint holds: what resume must drop
    (killed / ".tmp-lora_stage1_merged.a1b2").mkdir()  # as a merge killed half way leaves it
    assert train(tiny(workdir, "killed", 5)) is not None
    assert metrics(killed) == metrics(workdir / "full")
    assert tensorboard_scalars(killed) == tensorboard_scalars(workdir / "full")
    assert list(killed.glob(".tmp-*")) == []


@pytest.mark.slow
def test_a_non_finite_loss_skips_the_update_and_k_in_a_row_stop_the_run(workdir, monkeypatch):
    from safetensors.torch import load_file

    from trainer.train import NonFiniteError, train

    nan_depth_loss(monkeypatch, {2, 4, 5})
    run = workdir / "nan"
    with pytest.raises(NonFiniteError) as e:
        train(tiny(workdir, "nan", 6, "train.save_every=1", "train.max_nonfinite_steps=2"))
    for needle in ("2 optimizer steps in a row (steps 4-5)", "depth=nan", "train.max_nonfinite_steps=2"):
        assert needle in str(e.value), needle
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("skipped", False) for r in rows] == [False, True, False, True, True]
    assert np.isnan(rows[1]["depth"]) and np.isfinite(rows[2]["depth"])
    before, after = (load_file(run / f"checkpoints/step-00000{s}/trainable.safetensors") for s in (3, 4))
    for name, value in after.items():  # step 4 was skipped: nothing moved, nothing went NaN
        assert torch.equal(value, before[name]) and value.isfinite().all(), name
    assert not (run / "lora_stage1_merged").exists()


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["1.0", "null"])  # null: the engine clips at inf, which keeps its norm check
def test_under_deepspeed_a_non_finite_loss_skips_the_engine_step(workdir, tmp_path, clipping):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    script = tmp_path / "nan_at_step_2.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(REPO)!r})
from trainer.heads.depth import DepthHead
real, calls = DepthHead.row_losses, [0]
def row_losses(self, prediction, targets):
    calls[0] += 1
    value = real(self, prediction, targets)
    return value * float("nan") if calls[0] == 2 else value
DepthHead.row_losses = row_losses
from trainer.__main__ import main
main(sys.argv[1:])
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script),
           "--config", "configs/tiny.yaml", *overrides(workdir, f"ds-{clipping}", 2, "train.save_every=1",
                                                       "train.device=cpu", f"train.max_grad_norm={clipping}",
                                                       "train.deepspeed=configs/deepspeed/zero2.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 2: non-finite loss (loss=nan, depth=nan); optimizer step skipped" in proc.stdout + proc.stderr
    run = workdir / f"ds-{clipping}"
    assert [r.get("skipped", False) for r in metrics(run)] == [False, True]
    first, second = (load_file(run / f"checkpoints/step-00000{s}/trainable.safetensors") for s in (1, 2))
    for name, value in second.items():
        assert torch.equal(value, first[name]), name
    assert (run / "final" / "covt_heads.safetensors").is_file()


@pytest.mark.slow
def test_the_trainer_stops_at_a_damaged_sample_or_skips_and_counts_it(workdir):
    from shards.reader import rank_epoch_order
    from trainer.train import train

    damaged = Path(shutil.copytree(workdir / "cache", workdir / "damaged"))
    first = int(rank_epoch_order(7, 4, seed=0, epoch=0, rank=0, world_size=1)[0])  # the first sample trained on
    image = entry_of(damaged, first)["members"][1]
    flip(damaged / layout.tar_name(first // 4), image["offset"] + image["size"] // 2)
    with pytest.raises(DamagedSampleError, match=rf"{layout.sample_key(first)} .*checksum mismatch in "
                                                 rf"{image['name']}"):
        train(tiny(workdir, "stops", 2, cache="damaged"))
    assert train(tiny(workdir, "skips", 2, "train.on_damaged_sample=skip", cache="damaged")) is not None
    rows = metrics(workdir / "skips")
    assert [r.get("damaged_samples_skipped") for r in rows] == [1, 1]


def test_a_resumed_runs_event_file_sorts_after_the_killed_runs_even_within_the_same_second(tmp_path):
    from trainer.metrics import wait_for_a_later_event_file_name

    tb = tmp_path / "tb"
    tb.mkdir()
    killed = tb / f"events.out.tfevents.{int(time.time()):010d}.host.99999.0"  # a higher pid than ours
    killed.touch()
    wait_for_a_later_event_file_name(tb)
    resumed = f"events.out.tfevents.{int(time.time()):010d}.host.1.0"
    assert sorted([killed.name, resumed])[-1] == resumed
