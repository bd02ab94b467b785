"""The console of both phases: leveled ``logging`` that does not break progress bars, and quiet libraries.

``setup_console(verbose)`` is called once by each entry point (``python -m precompute``, ``python -m
trainer`` and its ``generate``, ``evaluate`` and ``export``), each with the ``--verbose`` flag of
:func:`add_verbose_argument`. Our packages log through ``logging.getLogger(__name__)``; the handler writes through
``tqdm.write`` so a message never cuts the training bar. Without ``--verbose``, the libraries'
progress bars and the warnings known to be harmless here are silenced (:data:`HARMLESS_WARNINGS`);
everything our own code warns about stays. ``--verbose`` shows it all, at DEBUG for our packages.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings

from tqdm import tqdm

OUR_PACKAGES = ("covt", "shards", "precompute", "trainer", "inference", "bench")
# (message regex, category, why it is harmless here)
HARMLESS_WARNINGS = [
    (r".*is_gradient_checkpointing.*", FutureWarning, "transformers' own attribute, read at every model load"),
    (r".*(bos|eos)_token_id.*", UserWarning, "the tiny random CLIP config's special token ids"),
]
NOISY_LIBRARY_LOGGERS = ("transformers", "DeepSpeed", "deepspeed", "torch.distributed", "torch.export", "accelerate",
                         "peft", "huggingface_hub", "httpx", "urllib3", "wandb", "mlflow", "alembic", "filelock")


class TqdmHandler(logging.Handler):
    """A logging handler that prints through ``tqdm.write``, so an open progress bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 -- logging's contract: a failing handler must not raise
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    """INFO lines as the plain message; other levels prefixed with the level ("WARNING: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """The entry points' ``--verbose`` flag, for :func:`setup_console`."""
    parser.add_argument("--verbose", action="store_true",
                        help="show every library log line, progress bar and warning (quiet by default)")


def setup_console(verbose: bool = False) -> None:
    """Route our packages' logging through a tqdm-safe handler; silence library noise unless ``verbose``."""
    handler = TqdmHandler()
    handler.setFormatter(ConsoleFormatter("%(message)s"))
    for name in OUR_PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False
    logging.captureWarnings(False)
    if verbose:
        return
    quiet_libraries()


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Library progress bars off, library loggers at ERROR, the known harmless warnings ignored."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in NOISY_LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(errors_only)  # a filter outlives the setLevel of a library that configures itself on import
    for message, category, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
