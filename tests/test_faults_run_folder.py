"""Issue 23: one trainer per run folder, and a resumed run never silently changes its config."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from covt.config import DataConfig, load_config
from shards.lock import CacheBusyError
from trainer.run_folder import RUN_LOCK, ConfigChangedError, keep_launch_config, run_folder_lock

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                     f"cache.dir={tmp_path / 'no-cache'}",
                                                     f"model.path={tmp_path / 'base'}", *extra])


def test_a_second_trainer_on_an_output_dir_stops_naming_the_first(tmp_path):
    from trainer.train import train

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / RUN_LOCK).write_text(json.dumps({
            "host": socket.gethostname(), "pid": other.pid, "started": "2026-12-04T22:00:00Z",
            "job": f"other:{other.pid}", "what": "training"}))
        with pytest.raises(CacheBusyError, match=rf"is being written by training on host {socket.gethostname()} "
                                                 rf"\(pid {other.pid}, started 2026-12-04T22:00:00Z\): one "
                                                 r"training run per output_dir"):
            train(tiny_cfg(tmp_path))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [RUN_LOCK]  # nothing written
    finally:
        other.kill()
        other.wait()


def test_the_run_folder_lock_of_a_dead_trainer_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / RUN_LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                 "started": "?", "job": "x", "what": "training"}))
    with run_folder_lock(tmp_path):
        holder = json.loads((tmp_path / RUN_LOCK).read_text())
        assert (holder["pid"], holder["host"], holder["what"]) == (os.getpid(), socket.gethostname(), "training")
        assert holder["started"]
    assert not (tmp_path / RUN_LOCK).exists()


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    from trainer.train import train

    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"train.output_dir=.*run is a file; the run folder belongs there"):
        train(tiny_cfg(tmp_path))


def fake_resumable_run(tmp_path: Path, *settings: str) -> Path:
    """A run folder as a run with ``settings`` leaves it: its config and a checkpoint to resume from."""
    run = tmp_path / "run"
    keep_launch_config(tiny_cfg(tmp_path, *settings), run)
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "state.pt").write_bytes(b"")
    return run


def test_resuming_under_a_changed_config_is_refused_naming_the_keys(tmp_path):
    from trainer.train import train

    run = fake_resumable_run(tmp_path, "train.lr=5e-5")
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigChangedError, match=r"resuming under a config that differs .*train.lr: 5e-05 -> "
                                                 r"0.001; train.seed: 0 -> 7\. .*--allow-config-change"):
        train(tiny_cfg(tmp_path, "train.lr=1e-3", "train.seed=7", "train.num_workers=3"))
    assert (run / "config.yaml").read_text() == before  # the folder still says what the run trained with
    assert not (run / RUN_LOCK).exists()


def test_a_changed_config_that_trains_the_same_run_resumes(tmp_path):
    from shards.reader import CacheError
    from trainer.train import train

    fake_resumable_run(tmp_path)
    with pytest.raises(CacheError):  # past the config check: the (absent) cache is next
        train(tiny_cfg(tmp_path, "train.num_workers=3", "cache.local_max_gb=2", "train.log_every=5"))


@pytest.mark.slow
def test_an_intended_config_change_resumes_and_every_launch_is_recorded(tmp_path):
    from tests.synthetic import write_synthetic_cache
    from trainer.train import train

    data = DataConfig(path=str(REPO / "data/sample/conversations.json"),
                      image_folder=str(REPO / "data/sample/images"), on_bad_record="error")
    write_synthetic_cache(tmp_path / "cache", data, ["depth"], shard_size=4)
    common = [f"cache.dir={tmp_path / 'cache'}", "anchors=[depth]", "train.save_every=1",
              "train.stages=[{name: understanding, steps: 3, merge_after: true}]"]
    assert train(tiny_cfg(tmp_path, *common), stop_after=1) is None
    changed = tiny_cfg(tmp_path, *common, "train.lr=2e-3")
    with pytest.raises(ConfigChangedError, match=r"train.lr: 0.001 -> 0.002"):
        train(changed)
    assert train(changed, allow_config_change=True) is not None
    run = tmp_path / "run"
    launches = sorted((run / "launches").iterdir())
    assert [yaml.safe_load(p.read_text())["train"]["lr"] for p in launches] == [1e-3, 2e-3]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 2e-3
    assert not (run / RUN_LOCK).exists()
