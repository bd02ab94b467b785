"""The optimizer and learning-rate schedule of one run (the stages between two merges), the reference's.

The reference (Wakals/CoVT ``train/scripts/run.sh`` and ``QwenTrainer.create_optimizer``
in ``train/src/training/trainer.py``) trains with AdamW at ``learning_rate`` 5e-5, except
parameters whose name contains ``_projection``, ``query_vectors`` or ``cross_attention``
(the heads' input projections, learned queries and attention) at ``projection_layer_lr``
1e-5; weight decay 0.1 on everything but biases and normalisation weights; a linear
warm-up over the first 5% of the run's steps, then a cosine decay to 0 (Hugging Face's
``cosine`` schedule); no gradient clipping as it runs (its DeepSpeed JSON sets none:
``train.max_grad_norm``, README "What the reference does as its code runs"). Each ``run.sh``
call is one run with its own schedule, so the schedule restarts after each merge.

Trainable here: the LoRA adapters, the new token rows (peft's ``trainable_tokens_delta``,
the rows of the added tokens only) and the heads. The reference trains whole
``embed_tokens``/``lm_head`` matrices with the gradient of the old rows masked to zero,
so its AdamW still decays every old row (``p -= lr * wd * p``); here the old rows are
not parameters of the optimizer and stay exactly the base model's.
:func:`untouched_row_shrink` measures what the reference does to them (README,
"Differences from the reference").
"""
from __future__ import annotations

import math

import torch
from transformers import get_cosine_schedule_with_warmup

from covt.config import TrainConfig
from trainer.heads import uses_projection_lr  # the heads name their parameters to fit the reference's rule


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm, RMSNorm (torch's or a model's own, e.g. Qwen2RMSNorm), GroupNorm, BatchNorm2d, LayerNorm2d."""
    return "Norm" in type(module).__name__


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters AdamW does not decay: biases and the weights of normalisation layers."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name == "bias" or name.endswith("_bias") or is_norm(module):
                names.add(full)
    return names


def param_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """AdamW groups (non-empty ones only): lr / projection_lr x decay / no decay; frozen tensors left out."""
    no_decay = no_decay_names(model)
    groups: dict[tuple[bool, bool], list] = {key: [] for key in [(False, True), (False, False), (True, True),
                                                                 (True, False)]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(uses_projection_lr(name), name not in no_decay)].append(p)
    return [{"params": params, "lr": t.projection_lr if projection else t.lr,
             "weight_decay": t.weight_decay if decay else 0.0,
             "name": f"{'projection' if projection else 'main'}{'' if decay else '_no_decay'}"}
            for (projection, decay), params in groups.items() if params]


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`: torch's multi-tensor implementation, or its fused kernels (train.optim)."""
    return torch.optim.AdamW(param_groups(model, t), lr=t.lr, weight_decay=t.weight_decay,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             fused=True if t.optim == "adamw_torch_fused" else None)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rates by config name: {"lr": ..., "projection_lr": ...} (the groups that exist)."""
    return {"projection_lr" if g["name"].startswith("projection") else "lr": g["lr"] for g in optimizer.param_groups}


def warmup_steps(run_steps: int, warmup_ratio: float) -> int:
    """Hugging Face's rounding of a warm-up ratio (``TrainingArguments.get_warmup_steps``)."""
    return math.ceil(run_steps * warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, run_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the run, then cosine to 0 at its end; one step per optimizer step."""
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(run_steps, warmup_ratio), run_steps)


def untouched_row_shrink(run_steps: int, lr: float, weight_decay: float, warmup_ratio: float) -> float:
    """The factor the reference's AdamW multiplies a row with zero gradient by over one run.

    Measured, not derived: a row with a zero gradient goes through torch's AdamW with
    this schedule (Adam's update of a zero gradient is 0; decoupled decay remains).
    """
    row = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    optimizer = torch.optim.AdamW([row], lr=lr, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, run_steps, warmup_ratio)
    row.grad = torch.zeros_like(row)
    for _ in range(run_steps):
        optimizer.step()
        scheduler.step()
    return float(row.detach())
