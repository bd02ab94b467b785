"""PIDINet with the official table5_baseline.pth against the original implementation (tests/golden/pidinet)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from covt.config import CheckpointConfig, PrecomputeConfig
from precompute.anchors.pidinet import build_pidinet, load_pidinet
from precompute.anchors.vit import normalize_views, read_checkpoint

GOLDEN = Path(os.environ.get("COVT_PIDINET_GOLDEN_DIR") or Path(__file__).resolve().parent / "golden" / "pidinet")
CKPT = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "table5_baseline.pth"  # the bundled one
NPZ = GOLDEN / "pidinet_table5_baseline_golden.npz"
PHOTOS = ("astronaut", "chelsea")

pytestmark = pytest.mark.skipif(not NPZ.is_file(), reason=f"golden PIDINet outputs not found at {GOLDEN}")


@pytest.fixture(scope="module")
def golden():
    return np.load(NPZ)


@pytest.fixture(scope="module")
def views(golden) -> torch.Tensor:
    return torch.from_numpy(np.stack([golden[f"{p}.image"] for p in PHOTOS]))


def test_default_loader_target_is_side_output_1_within_1e4(golden, views):
    # variant left empty: the loader's default configuration must be the one the file was trained with;
    # the target is sigmoid(side 1), what the reference trains its PIDINet head on, not the fused map
    anchor = load_pidinet(CheckpointConfig(path=str(CKPT)), PrecomputeConfig(), torch.device("cpu"))
    edges = anchor.compute(views)["edges"]
    assert edges.shape == (2, 256, 256) and edges.dtype == np.float32
    for b, photo in enumerate(PHOTOS):
        np.testing.assert_allclose(edges[b], golden[f"{photo}.side1"], atol=1e-4, rtol=0)


def test_side_outputs_match_original_within_1e4(golden, views):
    net = build_pidinet(read_checkpoint(CKPT), CKPT, "baseline").eval()
    with torch.no_grad():
        outputs = net(normalize_views(views))
    for i, name in enumerate(["side1", "side2", "side3", "side4", "fused"]):
        for b, photo in enumerate(PHOTOS):
            np.testing.assert_allclose(outputs[i][b, 0].numpy(), golden[f"{photo}.{name}"], atol=1e-4, rtol=0)


def test_carv4_configuration_collapses_this_checkpoints_fused_output(views):
    # Why the default is `baseline`: CoVT's reference loads this file as carv4, which turns
    # the trained vanilla kernels into pixel-difference ones and the fused map into zeros.
    net = build_pidinet(read_checkpoint(CKPT), CKPT, "carv4").eval()
    with torch.no_grad():
        fused = net(normalize_views(views))[-1]
    assert fused.max().item() < 1e-3
