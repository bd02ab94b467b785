"""`python -m precompute` end to end on the tiny config: verify, resume after a kill, add an anchor, two ranks."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shards import layout
from shards.reader import Cache

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ALL = ["sam", "depth", "dino", "pidinet", "siglip", "metaclip"]
WITHOUT_PIDINET = [a for a in ALL if a != "pidinet"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def overrides(cache: Path, ckpts: Path, anchors: list[str]) -> list[str]:
    out = [f"cache.dir={cache}", "cache.shard_size=2", "data.limit=4", "precompute.batch_size=2",
           "precompute.num_workers=1", f"anchors=[{','.join(anchors)}]",
           # low thresholds so the random tiny SAM keeps masks and the mask path is exercised
           "precompute.sam.pred_iou_thresh=0.1", "precompute.sam.stability_score_thresh=0.0"]
    for name, file in (("sam", "sam_vit_tiny.pth"), ("depth", "depth_vit_tiny.pth"),
                       ("dino", "dinov2_vit_tiny.pth"), ("siglip", "siglip-tiny"), ("metaclip", "metaclip-tiny")):
        out.append(f"precompute.checkpoints.{name}.path={ckpts / file}")
    return out


def precompute_cmd(cache: Path, ckpts: Path, anchors: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "precompute", "--config", "configs/tiny.yaml", *extra,
            *overrides(cache, ckpts, anchors)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def file_hashes(cache: Path, anchor: str) -> dict[str, str]:
    files = sorted(p for p in (cache / layout.TARGETS_DIR / anchor).rglob("*") if p.is_file())
    files += sorted((cache / layout.PROGRESS_DIR).glob(f"*.{anchor}.json"))
    files += [cache / layout.declaration_name(anchor)]
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_same_targets(a: Path, b: Path, anchors: list[str]) -> None:
    ca, cb = Cache(a), Cache(b)
    assert len(ca) == len(cb) == 4
    for i in range(len(ca)):
        ta, tb = ca.targets(i, anchors), cb.targets(i, anchors)
        for anchor in anchors:
            for name, value in ta[anchor].items():
                assert torch.equal(value, tb[anchor][name]), f"sample {i}: {anchor}/{name} differs"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precompute")


@pytest.fixture(scope="module")
def full_cache(work) -> Path:
    """Five anchors in one run, then ``--anchors pidinet`` added: all six."""
    cache = work / "full"
    out = run(precompute_cmd(cache, work / "ckpt", WITHOUT_PIDINET))
    assert "precompute 4 samples" in out.stdout
    before = {a: file_hashes(cache, a) for a in WITHOUT_PIDINET}
    tars = {p.name: p.read_bytes() for p in (cache / layout.SAMPLES_DIR).glob("*.tar")}
    run(precompute_cmd(cache, work / "ckpt", WITHOUT_PIDINET, "--anchors", "pidinet"))
    for a in WITHOUT_PIDINET:
        assert file_hashes(cache, a) == before[a], f"adding pidinet changed {a}'s files"
    assert {p.name: p.read_bytes() for p in (cache / layout.SAMPLES_DIR).glob("*.tar")} == tars
    return cache


def test_cache_of_all_six_anchors_passes_inspect_verify(full_cache):
    run([sys.executable, "-m", "shards", "inspect", str(full_cache), "--verify"])
    assert sorted(Cache(full_cache).anchors) == sorted(ALL)
    manifest = Cache(full_cache).manifest
    assert manifest["anchors"]["sam"]["decoders"], "sam_decoder.pt must be exported"
    counts = [int(Cache(full_cache).targets(i, ["sam"])["sam"]["mask_count"]) for i in range(4)]
    assert all(1 <= c <= 8 for c in counts)


def test_killed_run_resumes_to_the_uninterrupted_result(full_cache, work):
    """Killed and resumed with the other anchors beside SAM (precompute.overlap_anchors, a second thread here): the
    targets of the run one after another."""
    cache = work / "resumed"
    beside = "precompute.overlap_anchors=true"
    proc = subprocess.Popen(precompute_cmd(cache, work / "ckpt", ALL, beside), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # anchors commit in parallel threads, in any order: shard 0 is done when all of them are
    first_shard = [cache / layout.targets_progress_name(0, a) for a in ALL]
    deadline = time.time() + 240
    while not all(p.exists() for p in first_shard) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(p.exists() for p in first_shard), "the run never finished its first shard"
    assert not (cache / layout.MANIFEST).exists(), "the run finished before it could be killed"
    done_before = {p.name: p.read_bytes() for p in (cache / layout.PROGRESS_DIR).glob("shard-000000.*.json")}

    out = run(precompute_cmd(cache, work / "ckpt", ALL, beside))
    assert "2 images computed" in out.stdout, "the rerun must only compute the unfinished shard"
    assert {p.name: p.read_bytes() for p in (cache / layout.PROGRESS_DIR).glob("shard-000000.*.json")} == done_before
    assert_same_targets(cache, full_cache, ALL)


def test_two_gloo_ranks_write_disjoint_shards_equal_to_one_rank(full_cache, work):
    cache = work / "two_ranks"
    anchors = ["sam", "siglip", "dino"]
    cmd = precompute_cmd(cache, work / "ckpt", anchors, "precompute.device=cpu")
    cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "precompute"]
    out = run(cmd)
    assert "rank 0/2" in out.stdout and "rank 1/2" in out.stdout
    assert "2 images computed" in out.stdout  # each rank: one shard of two images
    assert_same_targets(cache, full_cache, anchors)
