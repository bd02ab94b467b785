"""A training run's settings, resolved once from the loaded config and the number of processes.

Nothing changes the loaded config (``output_dir/config.yaml`` is what the user asked for): what a run derives
from it is computed here, frozen, and passed down: the gradient accumulation that keeps ``train.global_batch``
on this many GPUs, and everything ``train.thoughts: false`` (the direct fine-tune control) switches off: the
heads, the anchor losses of every stage, the visual thoughts in the training texts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from covt.config import Config, StageConfig, TrainConfig


@dataclass(frozen=True)
class BatchSettings:
    """What turns raw cache samples into model tensors (trainer.batch)."""

    anchors: tuple[str, ...]  # the cache's anchors (cfg.anchors): the thoughts a text may carry
    plain_only: bool  # every stage's text is the plain answer, without thoughts (the direct fine-tune control)
    seed: int  # train.seed: with the step and the sample index, the format's random choices
    plain_answer_fraction: float
    image_size: int  # model.image_size: the square view the VLM sees
    max_length: int | None  # train.max_length (None: no limit)
    stage4_draws: str  # train.stage4_draws: per_sample, or per_step (the samples of a step share one draw)
    packing: bool = False  # train.packing: a micro-batch's samples concatenated into one row (trainer.batch.pack)
    pad_to_multiple_of: int = 1  # train.pad_to_multiple_of: tokens and text-loss positions padded up to a multiple
    # train.cuda_graphs: each anchor's part spans every row, marked by whether it carries the anchor's thoughts, so
    # that which samples drew thoughts (stage 4's subsets, plain answers) does not make a layout of its own
    every_anchor_row: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> BatchSettings:
        t = cfg.train
        return cls(anchors=tuple(cfg.anchors), plain_only=not t.thoughts, seed=t.seed,
                   plain_answer_fraction=t.plain_answer_fraction, image_size=cfg.model.image_size,
                   max_length=t.max_length, stage4_draws=t.stage4_draws, packing=t.packing,
                   pad_to_multiple_of=t.pad_to_multiple_of, every_anchor_row=t.cuda_graphs)


@dataclass(frozen=True)
class RunSettings:
    """What the loop uses that the config does not say directly."""

    grad_accum: int  # micro-batches per optimizer step on this many processes
    batch_size: int  # train.batch_size: samples per micro-batch (and per validation batch)
    head_anchors: tuple[str, ...]  # the anchors that get a head and a loss
    stages: tuple[StageConfig, ...]  # train.stages, anchor losses off everywhere in the control
    batch: BatchSettings

    @property
    def anchor_losses(self) -> bool:
        """Whether any anchor loss is ever on (validation scores them when it is)."""
        return bool(self.head_anchors)

    @classmethod
    def resolve(cls, cfg: Config, world: int) -> RunSettings:
        t = cfg.train
        return cls(grad_accum=grad_accum_for(t, world), batch_size=t.batch_size, head_anchors=head_anchors(cfg),
                   stages=schedule_stages(t), batch=BatchSettings.from_config(cfg))


def grad_accum_for(t: TrainConfig, world: int) -> int:
    """train.grad_accum, or what keeps train.global_batch samples per optimizer step on ``world`` GPUs."""
    if t.global_batch is None:
        return t.grad_accum
    per_pass = t.batch_size * world
    if t.global_batch % per_pass:
        raise ValueError(f"train.global_batch={t.global_batch} is not a multiple of train.batch_size={t.batch_size} x "
                         f"{world} GPU(s); choose a train.batch_size that divides {t.global_batch // world or 1}")
    return t.global_batch // per_pass


def head_anchors(cfg: Config) -> tuple[str, ...]:
    """The anchors that get a head: none in the direct fine-tune control (train.thoughts: false)."""
    return tuple(cfg.anchors) if cfg.train.thoughts else ()


def schedule_stages(t: TrainConfig) -> tuple[StageConfig, ...]:
    """train.stages, with anchor losses off in every stage in the direct fine-tune control (train.thoughts: false)."""
    if t.thoughts:
        return tuple(t.stages)
    return tuple(dataclasses.replace(s, anchor_losses=False) for s in t.stages)
