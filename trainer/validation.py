"""Validation losses on the held-out samples of ``data.validation`` every ``train.validate_every`` steps.

Precompute caches the held-out samples in ``<cache.dir>/validation`` (shards.layout.validation_cache_dir),
a cache of their own, so they never reach the training stream. Here they are loaded once and scored
in one fixed format, stage 3's (every anchor's thought, then the answer), at a fixed format step, so the
curves compare across stages and runs: the text loss and, when the run trains thoughts, each anchor's
loss (the direct fine-tune control, ``train.thoughts: false``, formats them plain and has only the text loss).
Every rank computes the same numbers (ZeRO-3 needs all ranks in each forward); rank 0 logs them.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from covt.config import Config, StageConfig
from shards.layout import validation_cache_dir
from shards.reader import Cache, CacheError
from trainer.batch import batch_to, build_batch
from trainer.settings import RunSettings

VALIDATION_STAGE = StageConfig(name="reasoning", steps=1)
FORMAT_STEP = 0  # the format randomness of every validation pass is that of step 0


def load_validation(cfg: Config) -> list[dict]:
    """The held-out samples (images, conversations, targets), or [] without data.validation."""
    if cfg.data.validation is None:
        if cfg.train.validate_every:
            raise ValueError(f"train.validate_every={cfg.train.validate_every} needs held-out samples: set "
                             "data.validation (a count or a LLaVA JSON) and rerun precompute, or set "
                             "train.validate_every=0")
        return []
    folder = validation_cache_dir(cfg.cache.dir)  # a folder, or a URL like cache.dir (shards.storage)
    try:
        cache = Cache(folder, **cfg.cache.cache_kwargs())
    except CacheError as e:
        raise FileNotFoundError(f"data.validation is set but {folder} holds no finished cache ({e}); run "
                                f"precompute with the same data.validation ({cfg.data.validation!r}) first") from None
    try:
        return [cache.sample(i, list(cfg.anchors)) for i in range(len(cache))]
    finally:
        cache.close()


def validation_due(cfg: Config, done: int, samples: list[dict]) -> bool:
    every = cfg.train.validate_every
    return bool(samples) and every > 0 and done % every == 0


@torch.no_grad()
def validation_losses(model, forward, samples: list[dict], processor, tokens, settings: RunSettings,
                      device: torch.device, autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """Mean losses over ``samples`` in batches of train.batch_size; ``model`` is the CoVTModel, ``forward`` the
    model or its engine."""
    was_training = model.training
    model.eval()  # no LoRA dropout
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    size = settings.batch_size
    # run directly, never as a recorded graph: each anchor's part holds the rows that carry its thoughts only
    batch_settings = dataclasses.replace(settings.batch, every_anchor_row=False)
    try:
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            batch = build_batch(chunk, VALIDATION_STAGE, settings.anchor_losses, FORMAT_STEP, processor, tokens,
                                batch_settings, view_sizes=model.view_sizes(), vision=model.vision_geometry())
            with autocast():
                result = forward(batch_to(batch, device), settings.anchor_losses)
            for name, value in result.items():
                if name != "loss":
                    sums[name] += float(value) * len(chunk)
                    counts[name] += len(chunk)
    finally:
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sums}
