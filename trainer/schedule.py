"""The stage schedule: which stage, run and loss switches apply at a global optimizer step.

``train.stages`` lists the stages in order; a *run* is the stages between two
LoRA merges (each run trains a fresh LoRA on the base merged by the previous
run). With the seed recipe:

    run 0: understanding (6000)                          -> merge: lora_stage1_merged
    run 1: generation (3000), reasoning (3000),
           efficient_reasoning (4000, anchor losses off
           from step 8000 of the run)                    -> merge: lora_stage234_merged

Everything here is a pure function of the global optimizer step (the number of
optimizer steps already taken), so the stage of a batch is the same under
gradient accumulation, dataloader workers, several ranks and resume.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from covt.config import STAGE_NAMES, StageConfig


class ScheduleError(ValueError):
    """``train.stages`` does not describe a schedule the trainer can run."""


@dataclass(frozen=True)
class Run:
    """Consecutive stages trained with one LoRA, merged into the base at the end."""

    index: int
    stage_indices: tuple[int, ...]  # positions in train.stages
    start: int  # global step of the run's first optimizer step
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def merged_name(self) -> str:
        """Folder name of the model merged after this run, in the seed's vocabulary."""
        return "lora_stage" + "".join(str(i + 1) for i in self.stage_indices) + "_merged"


@dataclass(frozen=True)
class StageAt:
    """Where one global optimizer step falls in the schedule."""

    global_step: int
    stage: StageConfig
    stage_index: int  # 0-based position in train.stages (stage number = stage_index + 1)
    run_index: int
    step_in_run: int
    anchor_losses_on: bool

    @property
    def name(self) -> str:
        return self.stage.name


class Schedule:
    def __init__(self, stages: Sequence[StageConfig]):
        _validate(stages)
        self.stages = tuple(stages)
        self.stage_starts: list[int] = []
        runs: list[Run] = []
        step, run_first, run_start = 0, 0, 0
        for i, stage in enumerate(self.stages):
            self.stage_starts.append(step)
            step += stage.steps
            if stage.merge_after:
                runs.append(Run(len(runs), tuple(range(run_first, i + 1)), run_start, step - run_start))
                run_first, run_start = i + 1, step
        self.runs = tuple(runs)
        self.total_steps = step
        self._run_of_stage = {i: r for r in self.runs for i in r.stage_indices}
        _validate_loss_switches(self)

    def stage_end(self, stage_index: int) -> int:
        """Global step count at which stage ``stage_index`` is finished."""
        return self.stage_starts[stage_index] + self.stages[stage_index].steps

    def is_stage_end(self, steps_done: int) -> bool:
        return any(self.stage_end(i) == steps_done for i in range(len(self.stages)))

    def run_of_stage(self, stage_index: int) -> Run:
        """The run (stages trained between two merges) that stage ``stage_index`` belongs to."""
        return self._run_of_stage[stage_index]

    def stage_at(self, global_step: int) -> StageAt:
        if not 0 <= global_step < self.total_steps:
            raise IndexError(f"global step {global_step} is outside the schedule [0, {self.total_steps})")
        index = max(i for i, start in enumerate(self.stage_starts) if start <= global_step)
        stage = self.stages[index]
        run = self.run_of_stage(index)
        step_in_run = global_step - run.start
        off_from = stage.anchor_losses_off_from
        on = stage.anchor_losses and (off_from is None or step_in_run < off_from)
        return StageAt(
            global_step=global_step,
            stage=stage,
            stage_index=index,
            run_index=run.index,
            step_in_run=step_in_run,
            anchor_losses_on=on,
        )

    def describe(self) -> str:
        lines = []
        for run in self.runs:
            for i in run.stage_indices:
                s = self.stages[i]
                losses = "anchor losses " + ("off" if not s.anchor_losses else "on")
                if s.anchor_losses and s.anchor_losses_off_from is not None:
                    losses += f" until step {s.anchor_losses_off_from} of the run"
                lines.append(f"  stage {i + 1} {s.name}: steps {self.stage_starts[i]}-{self.stage_end(i)} ({losses})")
            lines.append(f"  merge -> {run.merged_name} after step {run.end}")
        return "\n".join(lines)


def _validate(stages: Sequence[StageConfig]) -> None:
    if not stages:
        raise ScheduleError("train.stages is empty: list at least one stage "
                            "(e.g. {name: understanding, steps: 6000, merge_after: true})")
    for i, s in enumerate(stages):
        where = f"train.stages[{i}]"
        if s.name not in STAGE_NAMES:
            raise ScheduleError(f"{where}.name: {s.name!r} is not one of {list(STAGE_NAMES)}")
        if isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps <= 0:
            raise ScheduleError(f"{where}.steps: must be a positive number of optimizer steps, got {s.steps!r}")
        if s.anchor_losses_off_from is not None and s.anchor_losses_off_from < 0:
            raise ScheduleError(f"{where}.anchor_losses_off_from: must be >= 0, got {s.anchor_losses_off_from}")
    if not stages[-1].merge_after:
        raise ScheduleError(
            f"train.stages[{len(stages) - 1}] ({stages[-1].name}) is the last stage but has merge_after: false; "
            "the last stage must merge so the final model contains every LoRA"
        )


def _validate_loss_switches(schedule: Schedule) -> None:
    """``anchor_losses_off_from`` counts from the run start; it must fall inside its own stage."""
    for i, s in enumerate(schedule.stages):
        if s.anchor_losses_off_from is None:
            continue
        run = schedule.run_of_stage(i)
        lo, hi = schedule.stage_starts[i] - run.start, schedule.stage_end(i) - run.start
        if not lo <= s.anchor_losses_off_from < hi:
            raise ScheduleError(
                f"train.stages[{i}].anchor_losses_off_from={s.anchor_losses_off_from} counts optimizer steps from the "
                f"start of run {run.index} (stages {[j + 1 for j in run.stage_indices]}), where stage {i + 1} "
                f"({s.name}) covers steps {lo}-{hi}; pick a value in [{lo}, {hi})"
            )
