"""The console: our messages through leveled logging, library noise off unless --verbose, `make train` quiet."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import logging, warnings, sys
from covt.console import setup_console
setup_console(verbose={verbose})
logging.getLogger("trainer.train").info("an info line")
logging.getLogger("trainer.train").debug("a debug line")
logging.getLogger("shards.reader").warning("a warning line")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
warnings.warn("a warning of ours", UserWarning)
"""


def console(verbose: bool) -> str:
    proc = subprocess.run([sys.executable, "-c", CHECK.format(verbose=verbose)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS=""))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_quiet_console_keeps_our_lines_and_drops_known_library_noise():
    out = console(verbose=False)
    assert "an info line" in out and "WARNING: a warning line" in out and "a warning of ours" in out
    assert "a debug line" not in out and "Setting accelerator" not in out and "is_gradient_checkpointing" not in out


def test_verbose_shows_everything():
    out = console(verbose=True)
    assert "a debug line" in out and "Setting accelerator" in out and "is_gradient_checkpointing" in out


NOISE = re.compile(r"warn|Loading weights|Writing model shards|Setting accelerator|\.pt2", re.IGNORECASE)


@pytest.mark.slow
def test_make_train_and_demo_on_the_embedded_default_print_no_warning(tmp_path):
    """`make train` then `make demo` as a user runs them (the default cache is made first when missing), one short
    stage."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    stages = "[{name: understanding, steps: 1, merge_after: true}]"
    proc = subprocess.run(["make", "train", f"PYTHON={sys.executable}",
                           f"ARGS=train.output_dir={tmp_path / 'train'} train.stages='{stages}'"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "train" / "final" / "config.json").is_file()
    demo = subprocess.run(["make", "demo", f"PYTHON={sys.executable}",
                           f"ARGS=--model {tmp_path / 'train' / 'final'} --thoughts {tmp_path / 'thoughts.png'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
    assert f"thoughts drawn: {tmp_path / 'thoughts.png'}" in demo.stdout
    out += demo.stdout + demo.stderr
    noisy = [line for line in re.split(r"[\r\n]", out) if NOISE.search(line)]
    assert noisy == [], "\n".join(noisy)
