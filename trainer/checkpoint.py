"""Training checkpoints under ``output_dir/checkpoints/step-XXXXXX`` that resume exactly.

A checkpoint holds what changes during a run and nothing of the frozen base:
``trainable.safetensors`` (LoRA adapters, new-token rows, heads), ``state.pt``
(optimizer, lr scheduler, global step, schedule position) and one
``rng-rankN.pt`` per rank. ``state.pt`` and the RNG files hold tensors and plain data only and are read with
``covt.untrusted.load_plain``: a checkpoint from someone else runs no code when loaded.
Under DeepSpeed, the engine's own files (partitioned
optimizer states, frozen parameters excluded) go in ``deepspeed/``.

Writes are atomic: everything goes to a hidden temporary folder that is renamed
into place once complete, so a crash never leaves a half checkpoint that resume
would pick up. Only the newest ``keep`` checkpoints are kept (train.save_total_limit; None keeps all).
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from covt.compute import barrier
from covt.fs import naming_disk_full
from covt.untrusted import check_pickle_globals, load_plain

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"  # temporary folders of checkpoints and of export.write_atomically: removed when a run resumes
# what DeepSpeed's own checkpoint files build besides tensors and plain data (ZeRO-2 and ZeRO-3)
DEEPSPEED_GLOBALS = {"deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler"}
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _NAME.match(p.name)
        if m and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def named_checkpoint(output_dir: str | Path, name: str | Path) -> Path:
    """The complete checkpoint ``name`` (a path, or step-XXXXXX) of ``output_dir``, for ``--resume PATH``."""
    found = dict((p.resolve(), p) for _, p in list_checkpoints(output_dir))
    candidates = [Path(name), Path(output_dir) / CHECKPOINTS / Path(name).name]
    for candidate in candidates:
        if candidate.resolve() in found:
            return found[candidate.resolve()]
    listed = ", ".join(p.name for p in found.values()) or "none"
    raise FileNotFoundError(f"--resume {name}: not a complete checkpoint of train.output_dir={output_dir} "
                            f"(its checkpoints: {listed}); a run resumes from its own checkpoints only, since "
                            "later runs start from its merged folders")


def remove_checkpoints_after(output_dir: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints later than ``step``: a run resumed from ``step`` rewrites them, and a later
    ``--resume auto`` must not pick one from the abandoned trajectory."""
    later = [p for s, p in list_checkpoints(output_dir) if s > step]
    for p in later:
        shutil.rmtree(p)
    return later


def rng_state() -> dict:
    """Every generator's state as tensors and plain data (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``model``, on the CPU, by parameter name.

    Under ZeRO-3 the parameters are partitioned; they are gathered here (they are
    small: adapters, token rows and heads).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gather = _zero3_gather([p for _, p in params])
    with gather:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params}


def _zero3_gather(params):
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    from contextlib import nullcontext

    return nullcontext()


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "", where: str = "") -> None:
    """Copy ``state`` (names starting with ``prefix``) into ``model``'s trainable parameters; all must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)}
    state = {n: t for n, t in state.items() if n.startswith(prefix)}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"{where}: checkpoint does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (was it written with other "
            "train.lora / anchors settings?)"
        )
    gather = _zero3_gather(list(params.values()))
    with gather, torch.no_grad():
        for n, p in params.items():
            if state[n].shape != p.shape:
                raise RuntimeError(f"{where}: {n} has shape {tuple(state[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(state[n].to(p.dtype))


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, meta: dict, optimizer=None,
                    scheduler=None, engine=None, rank: int = 0, world_size: int = 1, keep: int | None = 2) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls it (rank 0 writes the shared files)."""
    final = checkpoint_path(output_dir, step)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world_size)
    weights = trainable_state(model)  # collective under ZeRO-3
    with naming_disk_full(tmp, "training resumes from the last complete checkpoint"):
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0:
            save_file(weights, tmp / "trainable.safetensors")
            state = {"meta": dict(meta, global_step=step)}
            if engine is None:
                state["optimizer"] = optimizer.state_dict() if optimizer is not None else None
                state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            torch.save(state, tmp / "state.pt")
    barrier(world_size)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world_size)
    return final


def read_meta(path: str | Path) -> dict:
    return load_plain(Path(path) / "state.pt", "checkpoint state")["meta"]


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None, engine=None,
                    rank: int = 0) -> dict:
    """Restore a mid-run checkpoint into ``model`` and the optimizer; returns its meta (RNG is restored separately)."""
    path = Path(path)
    state = load_plain(path / "state.pt", "checkpoint state")
    if engine is not None:
        for file in sorted((path / "deepspeed").rglob("*.pt")):  # DeepSpeed unpickles them in full
            check_pickle_globals(file, DEEPSPEED_GLOBALS, "DeepSpeed checkpoint file")
        engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    load_trainable(model, load_file(path / "trainable.safetensors"), where=str(path))
    if engine is None:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
    return state["meta"]


def load_rng(path: str | Path, rank: int) -> None:
    file = Path(path) / f"rng-rank{rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no RNG state for rank {rank} (resuming with a different number of ranks?)")
    set_rng_state(load_plain(file, "RNG state"))


