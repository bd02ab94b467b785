"""The model loader: a Hugging Face Qwen2.5-VL folder (a base model, a run's merge, ``output_dir/final``) and the
trained heads of a final folder, or of a folder in the released CoVT checkpoints' layout (the heads inside the
model file under the reference's names). Training loads its base and merges through it; inference loads what training
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


# ----------------------------------------------------------------------------- the reference's layout
# Released CoVT checkpoints (and the reference's own merge, merge_lora_weights.py) are one folder: the
# CoVTForConditionalGeneration weights in fp16, the heads inside the model file under the reference's
# attribute names (covt_qwen2_5_vl.py 969-997), the VLM's keys as transformers 4.50 wrote them.
REFERENCE_ARCHITECTURE = "CoVTForConditionalGeneration"
REFERENCE_PARTS = {"attend.thought_projection.": "_projection.", "attend.query_vectors": "_query_vectors",
                   "attend.cross_attention.": "_cross_attention."}
DEPTH_GENERATOR = "depth_token_generator."  # the same name in both layouts
def reference_name(anchor: str, key: str) -> str:
    """The reference's name of our head parameter ``key`` of ``anchor`` (``attend.query_vectors`` of dino ->
    ``dino_query_vectors``)."""
    if key.startswith(DEPTH_GENERATOR):
        return key
    for ours, theirs in REFERENCE_PARTS.items():
        if key.startswith(ours):
            return anchor + theirs + key[len(ours):]
    raise KeyError(f"{anchor} head parameter {key!r} has no name in the reference's layout")


def model_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder (sharded with an index, or one model.safetensors)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def is_reference_layout(folder: str | Path) -> bool:
    """A folder in the released CoVT layout (heads inside the model file), not ours (covt_heads.json beside)."""
    config = Path(folder) / "config.json"
    return (not (Path(folder) / HEADS_JSON).is_file() and config.is_file()
            and REFERENCE_ARCHITECTURE in json.loads(config.read_text()).get("architectures", []))


def read_reference_heads(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """anchor -> its head's tensors under OUR names, read from the model file(s) of a reference-layout folder
    (only the names our heads have: the reference's unused depth_projection etc. are left out)."""
    from safetensors import safe_open

    from trainer.heads import HEADS

    theirs = {}
    for anchor in HEADS:
        theirs.update({anchor + part: (anchor, ours) for ours, part in REFERENCE_PARTS.items()})
    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in model_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.startswith(DEPTH_GENERATOR):
                    found.setdefault("depth", {})[key] = f.get_tensor(key)
                    continue
                for prefix, (anchor, ours) in theirs.items():
                    if key.startswith(prefix) and anchor != "depth":
                        found.setdefault(anchor, {})[ours + key[len(prefix):]] = f.get_tensor(key)
    return found


def reference_hidden_size(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    """The VLM hidden size the heads read, from their first Linear's input width."""
    for state in tensors.values():
        for key in ("attend.thought_projection.weight", DEPTH_GENERATOR + "0.weight"):
            if key in state:
                return int(state[key].shape[1])
    raise ValueError("no head projection found under the reference's names")


def load_reference_heads(tensors: dict[str, dict[str, torch.Tensor]], anchors: list[str],
                         dims: dict[str, dict[str, int]], decoders_dir: Path) -> torch.nn.ModuleDict:
    """Our heads for ``anchors`` holding a reference-layout folder's weights; sizes the tensors do not give
    (mask and map sizes) come from ``dims`` (the anchors' own), and every tensor's shape is checked."""
    from trainer.heads import CacheDims, build_heads

    missing = [a for a in anchors if a not in tensors]
    if missing:
        raise KeyError(f"no head for {missing} under the reference's names (found heads for {sorted(tensors)})")
    heads = build_heads(anchors, reference_hidden_size(tensors), CacheDims(dims, decoders_dir))
    for anchor in anchors:
        own = heads[anchor].state_dict()
        absent = sorted(set(own) - set(tensors[anchor]))
        if absent:
            raise KeyError(f"{anchor} head: {[reference_name(anchor, k) for k in absent]} missing from the model file")
        for key, value in own.items():
            if tensors[anchor][key].shape != value.shape:
                raise ValueError(f"{reference_name(anchor, key)}: shape {tuple(tensors[anchor][key].shape)}, but "
                                 f"{anchor}'s sizes ({dims[anchor]}) need {tuple(value.shape)}")
        heads[anchor].load_state_dict({k: tensors[anchor][k].float() for k in own})
    return heads.eval()
