"""A DeepSpeed JSON with the config's numbers in it, the way Hugging Face Trainer fills one.

Configs written for Hugging Face Trainer say ``"auto"`` where the trainer knows the value
(transformers' ``HfTrainerDeepSpeedConfig.trainer_config_process`` / ``trainer_config_finalize``).
:func:`resolve_deepspeed_config` fills the same keys from ``train.*``: the batch sizes and
accumulation, ``gradient_clipping``, ``bf16``/``fp16``, the ZeRO bucket sizes from the model's
hidden size, and the ``optimizer``/``scheduler`` parameters where the JSON has those sections.
A number the JSON states that disagrees with the config is an error naming both keys, as in
Hugging Face; an ``"auto"`` left over is an error naming its key.

The engine always trains with the trainer's own AdamW (two learning rates, no decay on biases
and norms) and per-run schedule (``trainer.optim``), which it is handed; DeepSpeed builds an
optimizer or scheduler from the JSON only when it is given none, so those sections are filled
for a valid file, not used.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

from covt.config import TrainConfig
from trainer.optim import warmup_steps

AUTO = "auto"


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON value that disagrees with the config, or an "auto" nothing fills."""


def resolve_deepspeed_config(raw: dict, t: TrainConfig, world: int, bf16: bool, max_grad_norm: float,
                             hidden_size: int, run_steps: int, where: str = "train.deepspeed",
                             grad_accum: int | None = None) -> dict:
    """``raw`` (a loaded DeepSpeed JSON) with every "auto" replaced by the config's value; ``grad_accum``: the
    accumulation resolved for this many GPUs (trainer.settings), train.grad_accum when None."""
    grad_accum = t.grad_accum if grad_accum is None else grad_accum
    ds = copy.deepcopy(raw)
    fill = Filler(ds, where)
    fill.match("train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size")
    fill.match("gradient_accumulation_steps", grad_accum, "train.grad_accum")
    fill.match("train_batch_size", t.batch_size * grad_accum * world,
               f"train.batch_size x train.grad_accum x {world} GPU(s)")
    # the engine computes the gradient norm only when it clips; its non-finite check (our skip) needs that norm
    fill.match("gradient_clipping", max_grad_norm, "train.max_grad_norm", add=True)
    # bf16 follows train.bf16 and the device (ignored on CPU), whatever the file says, as before "auto"
    ds.setdefault("bf16", {})["enabled"] = bf16
    fill.match("fp16.enabled", False, "fp16 (the trainer uses bf16 or fp32)", add=False)
    fill_optimizer_and_scheduler(fill, t, run_steps)
    fill_zero_buckets(fill, hidden_size)
    left = list(auto_keys(ds))
    if left:
        raise DeepSpeedConfigError(f"{where}: no config value fills {', '.join(left)} = \"auto\"; write a number")
    return ds


def read_deepspeed_json(path: str) -> dict:
    """train.deepspeed's file as written (its "auto" values unfilled)."""
    with open(path) as f:
        return json.load(f)


def fill_optimizer_and_scheduler(fill: Filler, t: TrainConfig, run_steps: int) -> None:
    if "optimizer" in fill.ds:
        fill.match("optimizer.params.lr", t.lr, "train.lr")
        fill.match("optimizer.params.betas", [t.adam_beta1, t.adam_beta2], "train.adam_beta1/adam_beta2")
        fill.match("optimizer.params.eps", t.adam_epsilon, "train.adam_epsilon")
        fill.match("optimizer.params.weight_decay", t.weight_decay, "train.weight_decay")
    if "scheduler" in fill.ds:
        fill.match("scheduler.params.warmup_min_lr", 0, "0")
        fill.match("scheduler.params.warmup_max_lr", t.lr, "train.lr")
        fill.match("scheduler.params.warmup_num_steps", warmup_steps(run_steps, t.warmup_ratio),
                   "train.warmup_ratio x the run's steps")
        fill.match("scheduler.params.total_num_steps", run_steps, "the run's steps")


def fill_zero_buckets(fill: Filler, hidden_size: int) -> None:
    """Hugging Face's sizes from the model's hidden size (only where the JSON says "auto")."""
    fill.auto_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    fill.auto_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    fill.auto_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


class Filler:
    """Fills dotted keys of a DeepSpeed config dict in place."""

    def __init__(self, ds: dict, where: str):
        self.ds, self.where = ds, where

    def _parent(self, dotted: str, create: bool) -> tuple[dict | None, str]:
        *path, last = dotted.split(".")
        node = self.ds
        for part in path:
            if not isinstance(node.get(part), dict):
                if not create:
                    return None, last
                node[part] = {}
            node = node[part]
        return node, last

    def match(self, dotted: str, value: Any, source: str, add: bool = True) -> None:
        """"auto" or absent -> ``value`` (absent only when ``add``); a different number is an error."""
        node, last = self._parent(dotted, create=add)
        if node is None:
            return
        current = node.get(last, AUTO if add else None)
        if current == AUTO:
            node[last] = value
        elif current is not None and not same(current, value):
            raise DeepSpeedConfigError(f"{self.where}: {dotted} is {current!r} but {source} is {value!r}; "
                                       f"write \"auto\" there (or change the config)")

    def auto_only(self, dotted: str, value: Any) -> None:
        node, last = self._parent(dotted, create=False)
        if node is not None and node.get(last) == AUTO:
            node[last] = value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isinf(a) or math.isinf(b):  # inf - 1.0 is within any relative tolerance of inf
            return a == b
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1)
    return a == b


def auto_keys(node: Any, prefix: str = ""):
    """The dotted keys still set to "auto"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from auto_keys(value, f"{prefix}{key}.")
    elif node == AUTO:
        yield prefix.rstrip(".")
