"""``python -m trainer export``: a checkpoint or a trained folder as a model folder, in our layout or the reference's.

``--checkpoint RUN/checkpoints/step-N --out DIR``: any checkpoint as a model folder.

The folder is the one training writes as ``final`` (merged weights + processor + the heads), built
from the step's state: the checkpoint's run starts from the base model (run 0) or the previous
run's merged folder in the same run folder; its adapters and token rows are merged into that, and
its heads exported beside. ``python -m trainer evaluate --model DIR`` scores it, so each kept
checkpoint (``train.save_total_limit: null`` keeps all) can be compared and the best step chosen.
The run folder's ``config.yaml`` (the config it trained with) says the LoRA, anchors and cache.

``--format reference`` writes the released CoVT checkpoints' layout instead (fp16 or ``--dtype``, the heads
inside the model file under the reference's names; :func:`trainer.export.export_reference`), from a
checkpoint or from a trained folder (``--model output_dir/final``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from covt.config import Config, load_config
from covt.console import add_verbose_argument, setup_console
from shards.reader import Cache
from trainer.checkpoint import read_meta
from trainer.export import DTYPES, HEADS_JSON, export_final, export_reference, load_processor, merge_to_folder
from trainer.heads import build_heads
from trainer.schedule import Schedule
from trainer.settings import head_anchors, schedule_stages
from trainer.tokens import add_thought_tokens
from trainer.train import load_heads, load_vlm_config, vlm_tensors


def checkpoint_base(cfg: Config, run_dir: Path, run_index: int) -> Path:
    """The model the checkpoint's run started from: the base model or the previous run's merge."""
    if run_index == 0:
        return Path(cfg.model.path)
    base = run_dir / Schedule(schedule_stages(cfg.train)).runs[run_index - 1].merged_name
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: the merged folder this checkpoint's run (run {run_index}) starts from is "
                                "missing; the checkpoint cannot be exported without it")
    return base


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``checkpoint`` (RUN/checkpoints/step-N) as a final-style model folder at ``out``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "state.pt").is_file() or not (checkpoint / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: not a complete training checkpoint "
                                "(state.pt and trainable.safetensors expected)")
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: the run folder's config is missing; export reads the "
                                "LoRA, anchors and cache settings the checkpoint was trained with from it")
    cfg = load_config(run_dir / "config.yaml")
    meta = read_meta(checkpoint)
    base = checkpoint_base(cfg, run_dir, meta["run_index"])
    state = load_file(checkpoint / "trainable.safetensors")
    heads = build_heads(list(head_anchors(cfg)), load_vlm_config(base).text_config.hidden_size,
                        Cache(cfg.cache.dir, **cfg.cache.cache_kwargs()))
    load_heads(heads, state, where=str(checkpoint))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as tmp:
        merged = merge_to_folder(base, cfg.train.lora, vlm_tensors(state), Path(tmp) / "merged",
                                 token_seed=cfg.train.seed)
        tokens = add_thought_tokens(load_processor(merged))
        export_final(merged, heads, tokens, cfg.train.loss_weights, out)
        shutil.rmtree(merged)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer export", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder, RUN/checkpoints/step-XXXXXX")
    source.add_argument("--model", help="a trained CoVT folder (output_dir/final); with --format reference")
    parser.add_argument("--out", required=True, help="the model folder to write (replaced if it exists)")
    parser.add_argument("--format", choices=["covt", "reference"], default="covt",
                        help="covt: a folder like output_dir/final (default); reference: the released CoVT "
                             "checkpoints' layout, which tools written for those checkpoints load")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="--format reference: the weights' dtype")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    if args.model and args.format != "reference":
        parser.error("--model is already a trained folder: give --format reference, or --checkpoint")
    if args.model and not (Path(args.model) / HEADS_JSON).is_file():
        parser.error(f"--model {args.model} has no {HEADS_JSON}: give a trained CoVT folder (output_dir/final)")
    try:
        out = export_any(args.checkpoint, args.model, args.out, args.format, args.dtype)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = f"step {read_meta(args.checkpoint)['global_step']}" if args.checkpoint else args.model
    print(f"exported {what}: {out} (score it: python -m trainer evaluate --model {out} --benchmark FILE.tsv)")
    return 0


def export_any(checkpoint: str | None, model: str | None, out: str | Path, layout: str, dtype: str) -> Path:
    """``checkpoint`` (or the trained folder ``model``) written to ``out`` in ``layout`` (covt | reference)."""
    if layout == "covt":
        return export_checkpoint(checkpoint, out)
    if model is not None:
        return export_reference(model, out, dtype)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=Path(out).parent) as tmp:
        return export_reference(export_checkpoint(checkpoint, Path(tmp) / "final"), out, dtype)
