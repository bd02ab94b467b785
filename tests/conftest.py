"""Shared fixtures: offline Hugging Face, the bundled sample dataset, golden files, a small synthetic cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# set before any test module imports transformers / huggingface_hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
ALL_ANCHORS = ["sam", "depth", "dino", "pidinet", "siglip", "metaclip"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def sample_data_cfg():
    """The bundled sample dataset (data/sample: 7 photos with LLaVA conversations)."""
    from shards.config import DataConfig

    return DataConfig(path=str(REPO / "data" / "sample" / "conversations.json"),
                      image_folder=str(REPO / "data" / "sample" / "images"), on_bad_record="error")


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden files not available: {GOLDEN} is absent (it lives next to the repository)")
    return GOLDEN


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """A finished cache of the 7 sample records with synthetic targets for all six anchors, 4 per shard.

    Shared by the whole session: copy it (shutil.copytree) before changing anything in it.
    """
    from shards.config import DataConfig
    from shards.testing import write_synthetic_cache

    cfg = DataConfig(path=str(REPO / "data" / "sample" / "conversations.json"),
                     image_folder=str(REPO / "data" / "sample" / "images"), on_bad_record="error")
    return write_synthetic_cache(tmp_path_factory.mktemp("synthetic") / "cache", cfg, ALL_ANCHORS, shard_size=4)
