"""The README's config reference is generated from covt.config, so it cannot drift; its commands are run."""
import re
import shlex
from pathlib import Path

import pytest

from covt.config import load_config, reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def section(title: str) -> str:
    return README.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_config_reference_matches_the_config_dataclasses():
    assert reference_markdown() in README.read_text(), (
        "README.md's config reference is stale: replace it with the output of `python -m covt.config`"
    )


def test_readme_starts_with_set_up_in_two_commands_then_the_papers_model():
    titles = re.findall(r"^## (.+)$", README.read_text(), re.MULTILINE)
    assert titles[:2] == ["Set up", "Train the paper's model"]
    first_block = section("Set up").split("```\n", 2)[1]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make test", "make train"]


def quick_start_commands() -> list[list[str]]:
    """The precompute/train commands of the quick start's table, as argument lists."""
    return [shlex.split(cmd) for cmd in re.findall(r"`((?:make|torchrun)[^`]*)`", section("Train the paper's model"))]


def config_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """(--config / CONFIG=, the key=value overrides, ARGS= split) of a make or python/torchrun command."""
    if argv[0] == "make":
        named = dict(a.split("=", 1) for a in argv[2:])
        return named.get("CONFIG", "configs/tiny.yaml"), shlex.split(named.get("ARGS", ""))
    config = argv[argv.index("--config") + 1]
    return config, [a for a in argv[argv.index("--config") + 2:] if "=" in a]


def test_the_quick_start_gives_commands_for_1_4_and_8_gpus_that_load():
    commands = quick_start_commands()
    assert len(commands) == 6
    assert [c[2] for c in commands if c[0] == "torchrun"] == ["4", "4", "8", "8"]
    for argv in commands:
        config, overrides = config_and_overrides(argv)
        cfg = load_config(REPO / config, overrides)
        assert cfg.data.path.endswith("*.parquet") and cfg.data.subset.size == 128000  # the recipe's subset
        assert cfg.anchors == ["sam", "depth", "dino"]


def test_the_tracker_example_loads():
    [example] = [line for line in README.read_text().splitlines() if "train.report_to=" in line and "make" in line]
    assert load_config(REPO / "configs/tiny.yaml", config_and_overrides(shlex.split(example))[1]).train.report_to == \
        ["tensorboard", "wandb"]


@pytest.mark.slow
def test_picking_the_best_step_commands_run(e2e_trained, tmp_path, run_trainer):
    """The export + evaluate commands of 'Picking the best step', on the shared tiny run (paths rewritten)."""
    block = section("Using the trained model").split("**Picking the best step**", 1)[1].split("```\n", 2)[1]
    commands = [line[2:] for line in block.replace("\\\n", "").splitlines() if line.startswith("$ ")]
    assert [c.split()[3] for c in commands] == ["export", "evaluate"]
    for command in commands:
        command = (command.replace("runs/tiny/train", str(e2e_trained)).replace("runs/tiny/", f"{tmp_path}/")
                   .replace("step-000009", "step-000007"))
        run_trainer(shlex.split(command)[3:])
    assert (tmp_path / "eval-steps" / "results.json").is_file()
