"""The stage schedule is a pure function of the global optimizer step."""
from pathlib import Path

import pytest

from covt.config import StageConfig, load_config
from trainer.schedule import Schedule, ScheduleError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def seed_recipe() -> list[StageConfig]:
    return [
        StageConfig("understanding", 6000, merge_after=True),
        StageConfig("generation", 3000),
        StageConfig("reasoning", 3000),
        StageConfig("efficient_reasoning", 4000, anchor_losses_off_from=8000, merge_after=True),
    ]


def test_seed_recipe_has_two_runs_named_like_the_seed():
    s = Schedule(seed_recipe())
    assert s.total_steps == 16000
    assert [(r.start, r.end, r.stage_indices) for r in s.runs] == [(0, 6000, (0,)), (6000, 16000, (1, 2, 3))]
    assert [r.merged_name for r in s.runs] == ["lora_stage1_merged", "lora_stage234_merged"]


@pytest.mark.parametrize(
    "step, name, run, step_in_run, step_in_stage",
    [
        (0, "understanding", 0, 0, 0),
        (5999, "understanding", 0, 5999, 5999),
        (6000, "generation", 1, 0, 0),
        (8999, "generation", 1, 2999, 2999),
        (9000, "reasoning", 1, 3000, 0),
        (11999, "reasoning", 1, 5999, 2999),
        (12000, "efficient_reasoning", 1, 6000, 0),
        (15999, "efficient_reasoning", 1, 9999, 3999),
    ],
)
def test_stage_boundaries_of_the_seed_recipe(step, name, run, step_in_run, step_in_stage):
    schedule = Schedule(seed_recipe())
    at = schedule.stage_at(step)
    assert (at.name, at.run_index, at.step_in_run) == (name, run, step_in_run)
    assert step - schedule.stage_starts[at.stage_index] == step_in_stage


def test_anchor_losses_switch_off_at_step_8000_of_the_second_run():
    s = Schedule(seed_recipe())
    # step 8000 of run 1 is global step 14000, in the middle of efficient_reasoning
    assert s.stage_at(13999).anchor_losses_on
    assert not s.stage_at(14000).anchor_losses_on
    assert not s.stage_at(15999).anchor_losses_on
    assert all(s.stage_at(k).anchor_losses_on for k in (0, 5999, 6000, 9000, 12000))


def test_stage_ends_and_merges():
    s = Schedule(seed_recipe())
    assert [k for k in range(1, 16001) if s.is_stage_end(k)] == [6000, 9000, 12000, 16000]
    assert s.stage_at(5999).run_index == 0 and s.stage_at(6000).run_index == 1


def test_stage_with_anchor_losses_false_never_switches_them_on():
    stages = [StageConfig("understanding", 3, anchor_losses=False, merge_after=True)]
    assert not any(Schedule(stages).stage_at(k).anchor_losses_on for k in range(3))


def test_outside_the_schedule_is_an_error():
    s = Schedule(seed_recipe())
    with pytest.raises(IndexError, match="16000"):
        s.stage_at(16000)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([], "empty"),
        ([StageConfig("understanding", 0, merge_after=True)], r"stages\[0\].steps"),
        ([StageConfig("thinking", 5, merge_after=True)], r"stages\[0\].name"),
        ([StageConfig("understanding", 5)], "last stage"),
        ([StageConfig("understanding", 5, anchor_losses_off_from=5, merge_after=True)], r"pick a value in \[0, 5\)"),
        (
            [StageConfig("understanding", 5, merge_after=True),
             StageConfig("generation", 5, anchor_losses_off_from=7, merge_after=True)],
            r"stages\[1\].anchor_losses_off_from=7",
        ),
    ],
)
def test_invalid_schedules_are_rejected_with_the_key(stages, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(stages)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates_and_has_a_runnable_schedule(path):
    cfg = load_config(path)
    Schedule(cfg.train.stages)
    if cfg.train.deepspeed:
        assert Path(cfg.train.deepspeed).is_file() or (CONFIGS.parent / cfg.train.deepspeed).is_file()
