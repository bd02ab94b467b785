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
# the small golden data files are in the repository (tests/golden/README.md); COVT_GOLDEN_DIR names another copy
GOLDEN = Path(os.environ.get("COVT_GOLDEN_DIR") or Path(__file__).resolve().parent / "golden")
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
    from covt.config import DataConfig

    return DataConfig(path=str(REPO / "data" / "sample" / "conversations.json"),
                      image_folder=str(REPO / "data" / "sample" / "images"), on_bad_record="error")


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden files not available: {GOLDEN} is absent (COVT_GOLDEN_DIR names their folder)")
    return GOLDEN


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """A finished cache of the 7 sample records with synthetic targets for all six anchors, 4 per shard.

    Shared by the whole session: copy it (shutil.copytree) before changing anything in it.
    """
    from covt.config import DataConfig
    from tests.synthetic import write_synthetic_cache

    cfg = DataConfig(path=str(REPO / "data" / "sample" / "conversations.json"),
                     image_folder=str(REPO / "data" / "sample" / "images"), on_bad_record="error")
    return write_synthetic_cache(tmp_path_factory.mktemp("synthetic") / "cache", cfg, ALL_ANCHORS, shard_size=4)


# ----------------------------------------------------------------- the trained tiny run (slow tests share it)
E2E_ANCHORS = ["sam", "depth", "dino"]
# understanding 2 -> merge; generation 2, reasoning 1, efficient_reasoning 2 (anchor losses off from step 4
# of that run, i.e. its last step) -> merge. save_every 3 puts a checkpoint in the middle of generation.
E2E_STAGES = ("[{name: understanding, steps: 2, merge_after: true}, {name: generation, steps: 2}, "
              "{name: reasoning, steps: 1}, "
              "{name: efficient_reasoning, steps: 2, anchor_losses_off_from: 4, merge_after: true}]")


@pytest.fixture(scope="session")
def e2e_workdir(tmp_path_factory):
    """A base model and a cache with synthetic targets plus the real (tiny, random) SAM decoder.

    The targets have the sizes of the tiny anchors whose checkpoints ``e2e_checkpoints`` names (written
    here), so the trained heads also decode what those anchors compute on a new image (generate --thoughts).
    """
    import torch

    from covt.config import CheckpointConfig, PrecomputeConfig, load_config
    from precompute.anchors import LOADERS
    from shards.reader import Cache
    from tests.synthetic import write_synthetic_cache

    root = tmp_path_factory.mktemp("e2e")
    data_cfg = load_config(REPO / "configs" / "tiny.yaml").data
    data_cfg.path = str(REPO / data_cfg.path)
    data_cfg.image_folder = str(REPO / data_cfg.image_folder)
    anchors = {name: LOADERS[name](CheckpointConfig(**spec), PrecomputeConfig(), torch.device("cpu"))
               for name, spec in e2e_checkpoints(root).items()}
    cache = write_synthetic_cache(root / "cache", data_cfg, E2E_ANCHORS,
                                  dims={name: model.dims() for name, model in anchors.items()}, shard_size=4)
    anchors["sam"].export_decoders(Cache(cache).decoders_dir)
    return root


def e2e_checkpoints(root: Path) -> dict[str, dict]:
    """precompute.checkpoints of the shared tiny run's anchors (seeded random tiny models under ``root``)."""
    return {name: {"path": str(root / f"{name}_vit_tiny.pth"), "variant": "vit_tiny", "random_init_seed": seed}
            for seed, name in enumerate(E2E_ANCHORS)}


def e2e_training_overrides(workdir: Path, output: str) -> list[str]:
    """Config overrides of the shared tiny run, writing to ``workdir/output``."""
    return [
        f"model.path={workdir / 'base'}",
        f"cache.dir={workdir / 'cache'}",
        f"train.output_dir={workdir / output}",
        f"anchors=[{','.join(E2E_ANCHORS)}]",
        f"data.path={REPO / 'data/sample/conversations.json'}",
        f"data.image_folder={REPO / 'data/sample/images'}",
        f"train.stages={E2E_STAGES}",
        "train.batch_size=1",
        "train.save_every=3",
        "train.lr=5e-3",
        "train.projection_lr=5e-3",
    ]


@pytest.fixture(scope="session")
def e2e_overrides():
    return e2e_training_overrides


def run_trainer_cli(args: list[str], timeout: int = 600):
    """``python -m trainer ARGS`` from the repository root, offline; fails the test with its stderr."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="session")
def run_trainer():
    """``run_trainer(args)``: ``python -m trainer ARGS`` in a subprocess; returns the finished process."""
    return run_trainer_cli


@pytest.fixture(scope="session")
def e2e_trained(e2e_workdir):
    """`python -m trainer` on the tiny config, start to finish, in one go; its output_dir."""
    run_trainer_cli(["--config", "configs/tiny.yaml", *e2e_training_overrides(e2e_workdir, "full")])
    return e2e_workdir / "full"
