"""The README's config reference is generated from covt.config, so it cannot drift."""
from pathlib import Path

from covt.config import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_config_dataclasses():
    assert reference_markdown() in README.read_text(), (
        "README.md's config reference is stale: replace it with the output of `python -m covt.config`"
    )


def test_readme_starts_with_install_then_test():
    setup = README.read_text().split("## Set up", 1)[1]
    assert setup.index("make install") < setup.index("make test") < setup.index("make precompute")
