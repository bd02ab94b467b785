"""A parquet file of the published schema through `python -m precompute` and `python -m trainer`, no conversion."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covt.config import load_config
from shards.reader import Cache
from tests.synthetic import sample_parquet_rows, write_covt_parquet

REPO = Path(__file__).resolve().parents[1]
ANCHORS = "[depth,dino,pidinet]"
STAGES = "[{name: understanding, steps: 1, merge_after: true}, {name: reasoning, steps: 1, merge_after: true}]"

pytestmark = pytest.mark.slow


def run(module: str, *overrides: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", module, "--config", "configs/tiny.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_parquet_subset_precomputes_and_trains(tmp_path):
    data_cfg = load_config(REPO / "configs" / "tiny.yaml").data
    data_cfg.path, data_cfg.image_folder = str(REPO / data_cfg.path), str(REPO / data_cfg.image_folder)
    rows = sample_parquet_rows(data_cfg)
    rows.append({**rows[0], "id": "corrupt", "image_bytes": b"\xff\xd8 not a jpeg"})
    parquet = write_covt_parquet(tmp_path / "train-00000.parquet", rows, row_group_size=3)
    common = [f"data.path={parquet}", "data.subset.size=5", "data.subset.seed=1", f"cache.dir={tmp_path / 'cache'}",
              f"anchors={ANCHORS}", "cache.shard_size=2", "cache.codec=auto"]
    for name, file in (("depth", "depth.pth"), ("dino", "dino.pth")):
        common.append(f"precompute.checkpoints.{name}.path={tmp_path / file}")
    out = run("precompute", *common, "--anchors", "depth,dino")
    assert "precompute 5 samples" in out

    cache = Cache(tmp_path / "cache")
    manifest = cache.manifest
    assert manifest["subset"] == {"size": 5, "seed": 1} and manifest["num_samples"] == 5
    for key in ("depth/depth", "dino/features"):  # codec auto: measured on the first shard, kept or bf16
        anchor, array = key.split("/")
        info = manifest["anchors"][anchor]["arrays"][array]
        calib = info["calibration"]
        assert calib["samples"] == 2 and info["codec"] == (calib["fell_back_to"] or calib["codec"])
    assert "calibration" not in manifest["anchors"]["depth"]["arrays"]["features"]  # bf16 under auto
    by_id = {r["id"]: r["image_bytes"] for r in rows}
    for i in range(len(cache)):
        sample = cache.sample(i)
        assert sample["image_bytes"][0] == by_id[sample["id"]]  # the parquet's bytes, unchanged
    assert set(cache.anchors) == {"depth", "dino"}
    run("precompute", *common, "--anchors", "pidinet")  # adds an anchor to the same subset's cache
    assert set(Cache(tmp_path / "cache").anchors) == {"depth", "dino", "pidinet"}

    run("trainer", *common, f"model.path={tmp_path / 'base'}", f"train.output_dir={tmp_path / 'train'}",
        f"train.stages={STAGES}", "train.batch_size=1", "train.save_every=100")
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) >= 2
