"""Issue 23: loading what someone else wrote runs no code, and every decoder the trainer loads is checked.

A crafted pickle (one that writes a file when unpickled) is planted in a checkpoint and in a cache; it
must be refused by name and the file must never appear.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from covt.config import load_config
from covt.untrusted import UnsafeFileError
from shards import layout
from shards.inspect import main as inspect_main
from shards.integrity import DamagedSampleError
from shards.reader import Cache
from tests.synthetic import write_synthetic_cache
from trainer import checkpoint
from trainer.heads import build_heads

REPO = Path(__file__).resolve().parents[1]


class WritesAFile:
    """Unpickling it calls ``exec``, which writes ``marker``: what a hostile file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def crafted_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"meta": {"global_step": 3}, "payload": WritesAFile(marker)}, buffer)
    return buffer.getvalue()


def tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "name": "lora"}], lr=1e-3)
    from trainer.optim import make_scheduler

    scheduler = make_scheduler(optimizer, 10, 0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


# ---------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_holds_plain_data_and_restores_optimizer_scheduler_and_every_rng(tmp_path):
    model, optimizer, scheduler = tiny_training_state()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, {"run": 0}, optimizer, scheduler)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    for name in ("state.pt", "rng-rank0.pt"):  # plain data: loads with weights_only=True
        torch.load(path / name, weights_only=True)
    fresh, fresh_opt, fresh_sched = tiny_training_state()
    meta = checkpoint.load_checkpoint(path, fresh, torch.optim.AdamW(
        [{"params": fresh.parameters(), "name": "lora"}], lr=1e-3), fresh_sched)
    assert meta == {"run": 0, "global_step": 3}
    checkpoint.load_rng(path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert fresh_sched.state_dict() == scheduler.state_dict()


@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, victim):
    model, optimizer, scheduler = tiny_training_state()
    path = checkpoint.save_checkpoint(tmp_path / "run", 3, model, {}, optimizer, scheduler)
    marker = tmp_path / "pwned"
    (path / victim).write_bytes(crafted_pickle(marker))
    with pytest.raises(UnsafeFileError, match=rf"{victim}: .* holds objects other than tensors and plain data; "
                                              r"refused without loading it"):
        checkpoint.read_meta(path) if victim == "state.pt" else checkpoint.load_rng(path, 0)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- cache decoders
def write_tiny_pidinet_stage1(folder: Path) -> list[str]:
    from precompute.anchors.pidinet import CONFIGS, PiDiNet, PidinetAnchor

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    net = PiDiNet(CONFIGS["baseline"], width=8, dil=4, sa=True)
    ckpt = folder.parent / "pidinet_tiny.pth"
    torch.save(net.state_dict(), ckpt)
    anchor = PidinetAnchor(net, "baseline", str(ckpt))
    anchor.input_size = 24
    return anchor.export_decoders(folder)


@pytest.fixture(scope="module")
def pidinet_cache(tmp_path_factory) -> Path:
    data = load_config(REPO / "configs" / "tiny.yaml").data
    data.path, data.image_folder = str(REPO / data.path), str(REPO / data.image_folder)
    root = tmp_path_factory.mktemp("pidinet")
    return write_synthetic_cache(root / "cache", data, ["pidinet"], shard_size=4,
                                 decoders={"pidinet": write_tiny_pidinet_stage1})


@pytest.fixture
def cache(tmp_path, pidinet_cache) -> Path:
    return Path(shutil.copytree(pidinet_cache, tmp_path / "cache"))


def resign_decoder(cache_dir: Path, name: str) -> None:
    """What someone with write access to the bucket could do: make the manifest name the planted file."""
    manifest = json.loads((cache_dir / layout.MANIFEST).read_text())
    path = cache_dir / layout.DECODERS_DIR / name
    manifest["anchors"]["pidinet"]["decoders"][name] = {"sha256": layout.sha256_bytes(path.read_bytes()),
                                                        "bytes": path.stat().st_size}
    manifest[layout.MANIFEST_CHECKSUM] = layout.manifest_checksum(manifest)
    (cache_dir / layout.MANIFEST).write_text(layout.dumps(manifest))


def pickled_weight_archive(source: Path, marker: Path) -> bytes:
    """``source`` (a torch.export archive) with its first weight stored as a crafted pickle."""
    out = io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w") as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        weight = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
        for item in zin.infolist():
            data = {config_name: json.dumps(config).encode(), weight: crafted_pickle(marker)}.get(item.filename)
            zout.writestr(item, data if data is not None else zin.read(item.filename))
    return out.getvalue()


def test_the_trainer_builds_the_pidinet_head_from_a_checked_cache(cache):
    heads = build_heads(["pidinet"], 32, Cache(cache))
    assert heads["pidinet"].view_size == 24


@pytest.mark.parametrize("victim", ["pidinet_stage1.pt2", "pidinet_stage1.json"])
def test_a_flipped_byte_in_a_decoder_or_its_metadata_stops_the_trainer_as_verify_does(cache, capsys, victim):
    path = cache / layout.DECODERS_DIR / victim
    if victim.endswith(".json"):
        path.write_text(path.read_text().replace('"input_size": 24', '"input_size": 25'))
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    with pytest.raises(DamagedSampleError, match=rf"decoders/{victim} \(pidinet\): checksum mismatch"):
        build_heads(["pidinet"], 32, Cache(cache))
    assert inspect_main([str(cache), "--verify"]) == 1
    assert f"PROBLEM decoders/{victim} (pidinet): checksum mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("resigned", [False, True], ids=["planted", "planted-and-manifest-resigned"])
def test_a_crafted_pickle_in_a_cached_decoder_archive_is_refused_and_runs_nothing(cache, tmp_path, resigned):
    marker = tmp_path / "pwned"
    path = cache / layout.DECODERS_DIR / "pidinet_stage1.pt2"
    path.write_bytes(pickled_weight_archive(path, marker))
    if resigned:
        resign_decoder(cache, "pidinet_stage1.pt2")
    with pytest.raises((DamagedSampleError, UnsafeFileError)) as e:
        build_heads(["pidinet"], 32, Cache(cache))
    assert "pidinet_stage1.pt2" in str(e.value)
    assert ("is stored as a pickled object" if resigned else "checksum mismatch") in str(e.value)
    assert not marker.exists()


def test_a_crafted_pickle_as_a_sam_decoder_is_refused_and_runs_nothing(tmp_path):
    from trainer.heads.sam import load_sam_decoder_spec

    marker = tmp_path / "pwned"
    (tmp_path / "sam_decoder.pt").write_bytes(crafted_pickle(marker))
    with pytest.raises(UnsafeFileError, match=r"sam_decoder.pt: SAM decoder holds objects other than tensors"):
        load_sam_decoder_spec(tmp_path / "sam_decoder.pt")
    assert not marker.exists()


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_is_refused_before_deepspeed_loads_it(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    model, optimizer, scheduler = tiny_training_state()
    path = checkpoint.save_checkpoint(tmp_path / "run", 3, model, {}, optimizer, scheduler)
    (path / "deepspeed").mkdir()
    # what DeepSpeed's own files build: accepted
    torch.save({"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0), "w": torch.ones(2)},
               path / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loaded = []
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: loaded.append(a))
    checkpoint.load_checkpoint(path, model, engine=engine)
    assert loaded
    marker = tmp_path / "pwned"
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(crafted_pickle(marker))
    with pytest.raises(UnsafeFileError, match=r"mp_rank_00_model_states.pt: DeepSpeed checkpoint file would build "
                                              r"\['builtins.exec'\] when unpickled"):
        checkpoint.load_checkpoint(path, model, engine=SimpleNamespace(load_checkpoint=None))
    assert not marker.exists()
