"""Over-long samples found at precompute time, as bad records, instead of stopping training at their step.

A sample trains on its answer only if the image and the question leave room for it within
``train.max_length``: the training text puts the image and the question before the answer, and truncation
never cuts the image. The image costs ``(model.image_size / (patch x merge))^2`` tokens (the square view
the VLM sees); the question is counted with the model's own tokenizer. Both are lower bounds of what the
trainer adds (system turn, turn markers, stage 1's thoughts), so a record refused here could never train.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from covt.config import Config
from precompute.records import IMAGE_TOKEN

log = logging.getLogger(__name__)


def image_tokens(model_path: Path, image_size: int) -> int:
    """Tokens of one square ``image_size`` view, from the model's preprocessor_config.json."""
    config_file = model_path / "preprocessor_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    side = int(config.get("patch_size", 14)) * int(config.get("merge_size", 2))
    return (image_size // side) ** 2


def length_check(cfg: Config) -> Callable[[list[dict]], str | None] | None:
    """``check(conversations)``: why the record cannot fit ``train.max_length``, or None; None when the
    model's tokenizer is not at ``model.path`` yet (the tiny default's is built by the trainer)."""
    path = Path(cfg.model.path)
    if not (path / "tokenizer_config.json").is_file():
        log.info("model.path %s has no tokenizer yet: sample lengths are not measured here", path)
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image, limit = image_tokens(path, cfg.model.image_size), cfg.train.max_length

    def check(conversations: list[dict]) -> str | None:
        question = conversations[0]["value"].replace(IMAGE_TOKEN, "")
        n = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        if image + n < limit:
            return None
        return (f"the image ({image} tokens) and the question ({n} tokens) fill train.max_length={limit}: no "
                f"answer token would be trained (raise train.max_length or shorten the question)")

    return check
