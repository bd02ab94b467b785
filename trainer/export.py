"""Merged model folders and the final CoVT folder.

``merge_to_folder`` rebuilds a run's model on the CPU from its base folder and the
trained tensors (adapters + token rows), merges the LoRA into the weights and saves
a standard Hugging Face folder (weights + processor with the thought tokens). Doing
it from the saved tensors rather than the live model works the same for the plain
path, ZeRO-2 and ZeRO-3 (whose live parameters are partitioned), and makes a merge
redoable from a checkpoint.

``export_final`` writes ``output_dir/final``: the last merged folder plus
``covt_heads.safetensors`` / ``covt_heads.json`` and the frozen decoders the heads
use (``covt_decoders/``). The folder loads with plain
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``;
``trainer.loading.load_covt_heads`` rebuilds the heads from it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from covt.anchors import ANCHORS
from covt.config import LoraConfig
from covt.fs import atomic_dir, naming_disk_full
from trainer.checkpoint import CHECKPOINTS, TMP_PREFIX, load_trainable
from trainer.heads import decoder_files, heads_metadata
from trainer.loading import (
    HEADS_JSON,
    HEADS_WEIGHTS,
    REFERENCE_ARCHITECTURE,
    load_covt_heads,
    load_processor,
    load_vlm,
    model_files,
    reference_name,
)
from trainer.lora import attach_lora, merge_lora
from trainer.tokens import ANCHOR_END, ANCHOR_START, ThoughtTokens, add_thought_tokens, pad_token

DECODERS = "covt_decoders"


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and rename the result to ``path`` (replacing it) only once it is complete."""
    with atomic_dir(path, TMP_PREFIX) as tmp:
        with naming_disk_full(path, "training resumes from its last checkpoint and redoes this write"):
            write(tmp)
    return Path(path)


def remove_interrupted_writes(output_dir: str | Path) -> list[Path]:
    """Delete the temporary folders an interrupted merge, export or checkpoint left in ``output_dir``
    (a 7B merge leaves ~15 GB); the run about to resume rewrites whatever they were for."""
    output_dir = Path(output_dir)
    removed = []
    for folder in (output_dir, output_dir / CHECKPOINTS):
        for tmp in sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else []:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


class NonFiniteTensorError(ValueError):
    """A merge or export would have written NaN/inf weights."""


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` if any floating tensor holds NaN or inf, naming them."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteTensorError(
            f"not writing {what}: {len(bad)} of {len(tensors)} tensors hold NaN/inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the trained weights diverged. Resume from an earlier "
            f"checkpoint (delete the later ones) with a lower train.lr")


def merge_to_folder(base_path: str | Path, lora: LoraConfig, vlm_state: dict[str, torch.Tensor], out: str | Path,
                    token_seed: int) -> Path:
    """Base folder + trained adapters/token rows (names as in the peft-wrapped VLM) -> merged HF folder.
    Full-parameter training (``lora.enabled`` false): ``vlm_state`` is every weight, saved in the base's dtype."""
    processor = load_processor(base_path)
    vlm = load_vlm(base_path)
    base_dtype = vlm.dtype
    tokens = add_thought_tokens(processor, vlm, seed=token_seed)
    peft_model = attach_lora(vlm, lora, tokens.ids)
    load_trainable(peft_model, vlm_state, where=f"merging into {base_path}")
    merged = merge_lora(peft_model).to(base_dtype)
    check_finite(merged.state_dict(), f"the merged model {out}")

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return write_atomically(out, write)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the 7B weights are ~15 GB: share them with the merged folder when possible
    except OSError:
        shutil.copy2(src, dst)


def heads_json(heads: torch.nn.ModuleDict, tokens: ThoughtTokens, loss_weights: dict[str, float]) -> dict:
    meta = heads_metadata(heads)
    meta.update(
        decoders_dir=DECODERS,
        token_counts={a: ANCHORS[a].tokens for a in meta["anchors"]},
        tokens={
            "anchor_start": {"token": ANCHOR_START, "id": tokens.start_id},
            "anchor_end": {"token": ANCHOR_END, "id": tokens.end_id},
            "pads": {a: {"token": pad_token(a), "id": tokens.pad_id[a]} for a in meta["anchors"]},
        },
        loss_weights={a: float(loss_weights.get(a, 1.0)) for a in meta["anchors"]},
    )
    return meta


def export_final(merged_dir: str | Path, heads: torch.nn.ModuleDict, tokens: ThoughtTokens,
                 loss_weights: dict[str, float], out: str | Path) -> Path:
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in heads.state_dict().items()}
    check_finite(state, f"the heads of {out}")
    meta = heads_json(heads, tokens, loss_weights)

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp)
        shutil.copytree(merged_dir, tmp, copy_function=_link_or_copy)
        save_file(state, tmp / HEADS_WEIGHTS, metadata={"format": "pt"})
        (tmp / HEADS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        decoders = tmp / DECODERS
        decoders.mkdir()
        for f in decoder_files(heads):
            shutil.copy2(f, decoders / Path(f).name)

    return write_atomically(out, write)


# ----------------------------------------------------------------------------- the reference's layout
# what released CoVT checkpoints look like (trainer.loading reads them): fp16 by default, the heads inside the
# model file under the reference's names
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def reference_head_tensors(heads: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
    return {reference_name(anchor, key): value for anchor, head in heads.items()
            for key, value in head.state_dict().items()}


def export_reference(final: str | Path, out: str | Path, dtype: str = "fp16") -> Path:
    """``final`` (our layout) -> ``out`` in the reference's: weights in ``dtype``, the heads inside the model
    file under the reference's names, architecture CoVTForConditionalGeneration, the processor as it is."""
    from safetensors import safe_open

    final, cast = Path(final), DTYPES[dtype]
    heads = load_covt_heads(final)
    files = model_files(final)

    def write(tmp: Path) -> None:
        for path in final.iterdir():
            if path.is_file() and not path.name.startswith(("model", "covt_heads")):
                shutil.copy2(path, tmp / path.name)
        for i, path in enumerate(files):
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k).to(cast) for k in f.keys()}
            if i == len(files) - 1:
                tensors.update({k: v.detach().to(cast).contiguous() for k, v in reference_head_tensors(heads).items()})
            check_finite(tensors, f"{out}/{path.name}")
            save_file(tensors, tmp / path.name, metadata={"format": "pt"})
        if len(files) > 1:
            index = json.loads((final / "model.safetensors.index.json").read_text())
            index["weight_map"].update({k: files[-1].name for k in reference_head_tensors(heads)})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = json.loads((final / "config.json").read_text())
        config.update(architectures=[REFERENCE_ARCHITECTURE], torch_dtype=str(cast).removeprefix("torch."),
                      dtype=str(cast).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_atomically(out, write)
