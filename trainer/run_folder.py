"""One training run per ``output_dir``, and a run folder that never lies about the config it trained with.

- :func:`run_folder_lock`: ``output_dir/run.lock`` names the trainer writing the folder (host, pid, start),
  taken with the cache writer lock's mechanism (``shards.lock``): a second trainer on the folder stops at
  once naming the first; the lock of a killed run is taken over.
- :func:`config_changes`: before a resumed run trains, its config is compared with the one the folder's run
  trained with (``config.yaml``); keys whose change alters the run are refused, named with both values,
  unless ``--allow-config-change`` says the change is intended. Every launch's config is kept under
  ``launches/`` and ``config.yaml`` is the latest (:func:`keep_launch_config`), so the folder records
  each change.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from covt.config import Config, config_yaml, flatten, save_config
from covt.fs import atomic_write
from shards.lock import CacheLock, LockFile

RUN_LOCK = "run.lock"
CONFIG = "config.yaml"
LAUNCHES = "launches"
# keys that change where or how often things are written or read, never what is trained
NEUTRAL_PREFIXES = ("precompute.", "cache.local_dir", "cache.local_max_gb", "train.num_workers",
                    "train.log_every", "train.save_every", "train.save_total_limit")


class ConfigChangedError(ValueError):
    """Resuming a run under a config that differs from the one it trained with."""


def run_folder_lock(output_dir: str | Path) -> CacheLock:
    """``with run_folder_lock(out):`` one trainer at a time writes ``out`` (every rank of a launch enters)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"train.output_dir={out} is a file; the run folder belongs there (checkpoints, "
                                 f"merges, final/): move the file or choose another train.output_dir")
    return CacheLock(out, LockFile(out, RUN_LOCK), what="training", rule="one training run per output_dir")


def changed_keys(old_yaml: str, new_yaml: str) -> dict[str, tuple]:
    """key -> (old, new) for every key that differs and changes what is trained."""
    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(NEUTRAL_PREFIXES)}


def config_changes(cfg: Config, output_dir: str | Path, resuming: bool, allow_change: bool) -> dict[str, tuple]:
    """The keys (-> (old, new)) a resumed run changes against ``output_dir/config.yaml``; refused unless
    ``allow_change``. Every rank calls it before any is written, so all stop together."""
    out = Path(output_dir)
    saved = out / CONFIG
    changes = changed_keys(saved.read_text(), config_yaml(cfg)) if resuming and saved.is_file() else {}
    if changes and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigChangedError(
            f"{out}: resuming under a config that differs from the one this run trained with ({saved}): {listed}. "
            f"Rerun with the run's settings, use a new train.output_dir (or --no-resume), or pass "
            f"--allow-config-change if the change is intended (it is recorded under {out / LAUNCHES})")
    return changes


def keep_launch_config(cfg: Config, output_dir: str | Path) -> Path:
    """``config.yaml`` becomes this launch's config; ``launches/NNN-<time>.yaml`` keeps every launch's."""
    out = Path(output_dir)
    launches = out / LAUNCHES
    launches.mkdir(parents=True, exist_ok=True)
    number = len(list(launches.glob("*.yaml"))) + 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    atomic_write(launches / f"{number:03d}-{stamp}.yaml", config_yaml(cfg).encode())
    return save_config(cfg, out / CONFIG)
