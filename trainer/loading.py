"""The model loader: a Hugging Face Qwen2.5-VL folder (a base model, a run's merge, ``output_dir/final``) and the
trained heads of a final folder. Training loads its base and merges through it; inference loads what training
wrote through it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.heads import CacheDims, build_heads

# the heads' files in a final folder (written by trainer.export.export_final)
HEADS_WEIGHTS = "covt_heads.safetensors"
HEADS_JSON = "covt_heads.json"


def load_vlm(path: str | Path, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def load_covt_heads(folder: str | Path) -> torch.nn.ModuleDict:
    """The trained heads of a final CoVT folder (for decoding visual thoughts)."""
    folder = Path(folder)
    meta = json.loads((folder / HEADS_JSON).read_text())
    heads = build_heads(meta["anchors"], meta["hidden_size"], CacheDims(meta["dims"], folder / meta["decoders_dir"]))
    heads.load_state_dict(load_file(folder / HEADS_WEIGHTS))
    return heads.eval()
