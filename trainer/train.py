"""The CoVT training loop: four stages, a LoRA merge after each run, the final folder.

Read top to bottom: set up (distributed, schedule, base model, cache, heads, resume
point), then for each run (the stages between two merges): the model for the run,
its optimizer, the data stream from where this run left off, the optimizer steps
(stage of the step -> batch -> forward -> backward -> step -> log -> checkpoint), and
the merge. The stage of every batch comes from ``schedule.stage_at(optimizer step)``
the data position and the torch seed (LoRA dropout) from the optimizer step, so a
resumed run sees exactly the stage, data and losses of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from shards.config import Config, TrainConfig, save_config
from shards.reader import Cache, StreamingDataset
from trainer.attention import use_varlen_vision_attention
from trainer.batch import BatchBuilder, batch_to
from trainer.checkpoint import (barrier, latest_checkpoint, load_checkpoint, load_rng, load_trainable, read_meta,
                                save_checkpoint, trainable_state)
from trainer.export import export_final, load_processor, load_vlm, merge_to_folder, remove_interrupted_writes
from trainer.heads import build_heads
from trainer.lora import attach_lora, trainable_summary
from trainer.model import CoVTModel
from trainer.optim import learning_rates, make_optimizer, make_scheduler
from trainer.schedule import Schedule
from trainer.tiny_model import ensure_base_model
from trainer.tokens import add_thought_tokens
from trainer.validation import load_validation, validation_due, validation_losses

MAX_GRAD_NORM = 1.0  # same as gradient_clipping in configs/deepspeed/*.json


def train(cfg: Config, resume: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or continue) the whole recipe; returns output_dir/final, or None when stopped by ``stop_after``."""
    t = cfg.train
    rank, world, device = setup_distributed(t)
    t.grad_accum = grad_accum_for(t, world)
    schedule = Schedule(schedule_stages(t))
    out = Path(t.output_dir)
    seed_everything(t.seed)
    cache = Cache(cfg.cache.dir)  # before any model: an unfinished or edited cache is said at once
    base_path = ensure_base_model_on_rank0(cfg, rank, world)
    hidden_size = load_vlm_config(base_path).text_config.hidden_size
    heads = build_heads(head_anchors(cfg), hidden_size, cache)
    validation = load_validation(cfg)  # data.validation's held-out samples, [] without

    if rank == 0:
        remove_interrupted_writes(out)  # temporary folders of a merge, export or checkpoint cut short
    barrier(world)
    checkpoint = latest_checkpoint(out) if resume else None
    step = read_meta(checkpoint)["global_step"] if checkpoint else 0
    if checkpoint:  # heads carry over merges, so every checkpoint restores them
        load_heads(heads, load_file(checkpoint / "trainable.safetensors"), where=str(checkpoint))
    log = Logger(out, rank, schedule.total_steps, step)  # drops what a cut-short run logged after ``step``
    guard = NonFiniteGuard(t.max_nonfinite_steps, log)
    if rank == 0:
        save_config(cfg, out / "config.yaml")  # what this run (or this resumption of it) trains with
    log.info(f"schedule ({schedule.total_steps} optimizer steps, {t.batch_size} x {t.grad_accum} x {world} "
             f"samples each):\n{schedule.describe()}")
    log.info(f"resuming from {checkpoint} at step {step}" if checkpoint else "starting from step 0")

    for run in schedule.runs:
        merged_dir = out / run.merged_name
        run_base = base_path if run.index == 0 else out / schedule.runs[run.index - 1].merged_name
        if step >= run.end:
            if not (merged_dir / "config.json").is_file():  # interrupted during the merge: redo it
                redo_merge(checkpoint, step, run, run_base, merged_dir, cfg, rank, world, log)
            continue

        # --- the model of this run: merged base + fresh LoRA + thought tokens + heads
        processor = load_processor(run_base)
        vlm = load_vlm(run_base, dtype=torch.bfloat16 if use_bf16(t, device) else torch.float32)
        tokens = add_thought_tokens(processor, vlm, seed=t.seed)
        if t.vision_attention == "varlen":
            use_varlen_vision_attention(vlm)
        if t.gradient_checkpointing:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(t.seed + 1000 * (run.index + 1))  # the fresh LoRA of each run is seeded
        vlm = attach_lora(vlm, t.lora, tokens.ids)
        model = CoVTModel(vlm, heads, tokens, t.loss_weights).to(device)
        optimizer = make_optimizer(model, t)
        scheduler = make_scheduler(optimizer, run.end - run.start, t.warmup_ratio)  # each run its own schedule
        engine = deepspeed_engine(model, optimizer, scheduler, t, world, device) if t.deepspeed else None
        log.info(f"run {run.index} (stages {[i + 1 for i in run.stage_indices]}) on {run_base}: "
                 f"{trainable_summary(model)}")

        resuming_mid_run = checkpoint is not None and run.start < step < run.end
        if resuming_mid_run:
            load_checkpoint(checkpoint, model, optimizer, scheduler, engine, rank)

        # --- data: this rank's stream, from the first sample the next optimizer step needs
        per_step = t.batch_size * t.grad_accum
        dataset = StreamingDataset(cfg.cache.dir, cfg.anchors, seed=t.seed, rank=rank, world_size=world,
                                   start=step * per_step, batch_size=t.batch_size, on_damaged=t.on_damaged_sample)
        collate = BatchBuilder(schedule, per_step, processor, tokens, cfg, model.view_sizes())
        loader = iter(torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, num_workers=t.num_workers,
                                                  collate_fn=collate, pin_memory=device.type == "cuda"))
        if resuming_mid_run:  # after the loader took its seed, as the uninterrupted run's loader did
            load_rng(checkpoint, rank)

        # --- optimizer steps
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step in range(step, run.end):
            log.start_clock()
            if stop_after is not None and step >= stop_after:
                log.info(f"stopping before step {step} (--stop-after {stop_after})")
                log.close()
                return None
            at = schedule.stage_at(step)
            torch.manual_seed(step_seed(t.seed, rank, step))  # dropout etc. depend on the step, not on history
            losses: dict[str, torch.Tensor] = {}  # read once per optimizer step: a sync per backward stalls the GPU
            for _ in range(t.grad_accum):
                batch = next(loader)
                if batch["step"] != step:
                    raise RuntimeError(f"the data stream is at optimizer step {batch['step']}, the loop at {step}")
                log.damaged_samples(batch["damaged_skipped"], step)
                with autocast(t, device):
                    result = (engine or model)(batch_to(batch, device), at.anchor_losses_on)
                backward(result, engine, t.grad_accum)
                for name, value in result.items():
                    losses[name] = losses.get(name, 0) + value.detach().float() / t.grad_accum
            losses, grad_norm, applied = finish_step(losses, engine, optimizer, scheduler, trainable)
            done = step + 1
            validation_result = (validation_losses(model, engine or model, validation, processor, tokens, cfg,
                                                   model.view_sizes(), device, lambda: autocast(t, device))
                                 if validation_due(cfg, done, validation) else None)
            log.step(done, at, losses, learning_rates(optimizer), every=t.log_every, skipped=not applied,
                     grad_norm=grad_norm, validation=validation_result)
            guard.check(done, applied, losses, grad_norm)
            if (t.save_every and done % t.save_every == 0) or schedule.is_stage_end(done):
                checkpoint = save_checkpoint(out, done, model, meta=position(schedule, done), optimizer=optimizer,
                                             scheduler=scheduler, engine=engine, rank=rank, world_size=world)
        step = run.end

        # --- merge this run's LoRA into its base -> the next run's base
        state = trainable_state(model)  # gathered under ZeRO-3
        del engine, model, optimizer, scheduler, vlm, loader, dataset, trainable
        free_memory()
        # carry the heads on as plain modules (the engine may have partitioned or cast the old ones)
        heads = build_heads(head_anchors(cfg), hidden_size, cache)
        load_heads(heads, state, where=f"end of run {run.index}")
        if rank == 0:
            log.info(f"merging run {run.index} into {merged_dir}")
            merge_to_folder(run_base, t.lora, vlm_tensors(state), merged_dir, token_seed=t.seed)
        barrier(world)

    final = out / "final"
    if rank == 0:
        processor = load_processor(out / schedule.runs[-1].merged_name)
        tokens = add_thought_tokens(processor)
        export_final(out / schedule.runs[-1].merged_name, heads, tokens, t.loss_weights, final)
        log.info(f"final model: {final} (= {schedule.runs[-1].merged_name} + covt_heads)")
    barrier(world)
    log.close()
    return final


# ----------------------------------------------------------------------------- pieces of the loop
def setup_distributed(t: TrainConfig) -> tuple[int, int, torch.device]:
    """Rank, world size and device from the launcher's environment (deepspeed / torchrun set RANK etc.)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if t.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(t.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world > 1 or t.deepspeed) and not torch.distributed.is_initialized():
        if t.deepspeed:
            import deepspeed

            if "RANK" not in os.environ:  # DeepSpeed without a launcher (`make train`): a one-process group
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
            deepspeed.init_distributed()
        else:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and not t.deepspeed:
        raise ValueError(f"{world} processes but train.deepspeed is not set: several GPUs need "
                         "train.deepspeed=configs/deepspeed/zero2.json (or zero3.json)")
    return rank, world, device


def grad_accum_for(t: TrainConfig, world: int) -> int:
    """train.grad_accum, or what keeps train.global_batch samples per optimizer step on ``world`` GPUs."""
    if t.global_batch is None:
        return t.grad_accum
    per_pass = t.batch_size * world
    if t.global_batch % per_pass:
        raise ValueError(f"train.global_batch={t.global_batch} is not a multiple of train.batch_size={t.batch_size} x "
                         f"{world} GPU(s); choose a train.batch_size that divides {t.global_batch // world or 1}")
    return t.global_batch // per_pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def ensure_base_model_on_rank0(cfg: Config, rank: int, world: int) -> Path:
    if rank == 0:
        ensure_base_model(cfg.model)
    barrier(world)
    return ensure_base_model(cfg.model)


def head_anchors(cfg: Config) -> list[str]:
    """The anchors that get a head: none in the direct fine-tune control (train.thoughts: false)."""
    return list(cfg.anchors) if cfg.train.thoughts else []


def schedule_stages(t: TrainConfig) -> list:
    """train.stages, with anchor losses off in every stage in the direct fine-tune control (train.thoughts: false)."""
    if t.thoughts:
        return list(t.stages)
    return [dataclasses.replace(s, anchor_losses=False) for s in t.stages]


def load_vlm_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def use_bf16(t: TrainConfig, device: torch.device) -> bool:
    return t.bf16 and device.type == "cuda"


def autocast(t: TrainConfig, device: torch.device):
    if use_bf16(t, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deepspeed_engine(model, optimizer, scheduler, t: TrainConfig, world: int, device: torch.device):
    import deepspeed

    with open(t.deepspeed) as f:
        ds_config = json.load(f)
    ds_config["train_micro_batch_size_per_gpu"] = t.batch_size
    ds_config["gradient_accumulation_steps"] = t.grad_accum
    # the engine computes the gradient norm only when it clips; its non-finite check (our skip) needs that norm
    ds_config.setdefault("gradient_clipping", MAX_GRAD_NORM)
    ds_config["train_batch_size"] = t.batch_size * t.grad_accum * world
    ds_config.setdefault("bf16", {})["enabled"] = use_bf16(t, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def position(schedule: Schedule, done: int) -> dict:
    """Where a checkpoint after ``done`` optimizer steps sits in the schedule (for people reading it)."""
    at = schedule.stage_at(done - 1)
    return {"stage": at.name, "stage_index": at.stage_index, "run_index": at.run_index,
            "step_in_run": at.step_in_run + 1, "stage_end": schedule.is_stage_end(done)}


def redo_merge(checkpoint, step, run, run_base, merged_dir, cfg, rank, world, log) -> None:
    if checkpoint is None or step != run.end:
        raise FileNotFoundError(f"{merged_dir} is missing and no checkpoint at the end of run {run.index} "
                                f"(step {run.end}) is left to rebuild it; rerun with --no-resume")
    if rank == 0:
        log.info(f"redoing the merge of run {run.index} from {checkpoint}")
        state = load_file(checkpoint / "trainable.safetensors")
        merge_to_folder(run_base, cfg.train.lora, vlm_tensors(state), merged_dir, token_seed=cfg.train.seed)
    barrier(world)


def load_heads(heads: torch.nn.ModuleDict, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy the ``heads.*`` tensors of a CoVTModel trainable state into ``heads``."""
    load_trainable(torch.nn.ModuleDict({"heads": heads}), state, prefix="heads.", where=where)


def vlm_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VLM's part of a CoVTModel trainable state (adapters, token rows), named as in the peft-wrapped VLM."""
    return {k.removeprefix("vlm."): v for k, v in state.items() if k.startswith("vlm.")}


def backward(result: dict, engine, grad_accum: int) -> None:
    """Backward of one micro-batch. Under DeepSpeed a non-finite loss is multiplied by NaN, so every
    gradient it reaches is NaN and the engine's own overflow check (ZeRO's grad-norm check, on with
    gradient clipping) skips the optimizer step and the lr scheduler, which ``finish_step`` reads back.
    (The loss is the sum of its parts, so it is non-finite when any part is; checked on the device.)"""
    loss = result["loss"]
    if engine is not None:
        loss = loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))
        engine.backward(loss)
        engine.step()  # steps the optimizer at the end of the accumulation only
    else:
        (loss / grad_accum).backward()


def finish_step(losses: dict[str, torch.Tensor], engine, optimizer, scheduler,
                trainable) -> tuple[dict[str, float], float, bool]:
    """End an optimizer step: (the step's mean losses, gradient norm before clipping, whether the update was
    applied), read from the device in one sync. A non-finite loss or gradient skips the update and the lr
    scheduler (as DeepSpeed does), never the step."""
    if engine is not None:
        values = dict(zip(losses, torch.stack(list(losses.values())).tolist()))
        norm = engine.get_global_grad_norm()
        return values, float("nan") if norm is None else float(norm), engine.was_step_applied()
    norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    *numbers, norm = torch.stack([*losses.values(), norm.float().to(losses["loss"].device)]).tolist()
    values = dict(zip(losses, numbers))
    applied = math.isfinite(values["loss"]) and math.isfinite(norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values, norm, applied


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; ``limit`` in a row stop the run."""

    def __init__(self, limit: int, log: "Logger"):
        self.limit, self.log = limit, log
        self.in_a_row = self.total = 0

    def check(self, done: int, applied: bool, losses: dict[str, float], grad_norm: float) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        what = (f"non-finite loss ({', '.join(f'{k}={v}' for k, v in bad.items())})" if bad
                else f"non-finite gradient (norm {grad_norm})")
        self.log.warning(f"step {done}: {what}; optimizer step skipped ({self.in_a_row} in a row, "
                         f"{self.total} in this session)")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"stopping: {self.in_a_row} optimizer steps in a row (steps {done - self.in_a_row + 1}-{done}) had a "
                f"non-finite loss or gradient, the last a {what} (train.max_nonfinite_steps={self.limit}). Check the "
                f"cache (`python -m shards inspect CACHE --verify`) and train.lr; rerunning resumes from the last "
                f"checkpoint")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Logger:
    """tqdm bar + TensorBoard (output_dir/tb) + output_dir/metrics.jsonl on rank 0; every rank writes
    output_dir/perf-rank{R}.jsonl (seconds per optimizer step, peak GPU memory), kept apart from the
    losses so that metrics.jsonl of a resumed run equals an uninterrupted one's: resuming at step
    ``initial`` drops the lines and TensorBoard points a cut-short run wrote after it."""

    def __init__(self, out: Path, rank: int, total: int, initial: int):
        self.active = rank == 0
        self.rank = rank
        self.damaged = 0
        out.mkdir(parents=True, exist_ok=True)
        self.perf = open(out / f"perf-rank{rank}.jsonl", "a")
        self.last_time = time.perf_counter()
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        wait_for_a_later_event_file_name(out / "tb")
        self.tb = SummaryWriter(str(out / "tb"), purge_step=initial + 1)  # readers hide points from a cut run
        truncate_metrics(out / "metrics.jsonl", initial)
        self.metrics = open(out / "metrics.jsonl", "a")
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def start_clock(self) -> None:
        """The optimizer step is timed from here (data, forward, backward, optimizer; not checkpoints)."""
        self.last_time = time.perf_counter()

    def info(self, message: str) -> None:
        if self.active:
            tqdm.write(message)

    def warning(self, message: str) -> None:
        """Every rank: a fault seen by one rank only (a damaged sample) must not go unsaid."""
        tqdm.write(f"WARNING rank {self.rank}: {message}" if self.rank else f"WARNING: {message}")

    def damaged_samples(self, problems: list[str], step: int) -> None:
        for problem in problems:
            self.damaged += 1
            self.warning(f"step {step + 1}: skipped damaged sample ({self.damaged} so far; "
                         f"train.on_damaged_sample=skip): {problem}")

    def step(self, done: int, at, losses: dict[str, float], lrs: dict[str, float], every: int,
             skipped: bool = False, grad_norm: float = float("nan"),
             validation: dict[str, float] | None = None) -> None:
        now = time.perf_counter()
        perf = {"step": done, "seconds": round(now - self.last_time, 4)}
        self.last_time = now
        if torch.cuda.is_available():
            perf["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.perf.write(json.dumps(perf) + "\n")
        self.perf.flush()
        if not self.active:
            return
        self.bar.set_description(f"stage {at.stage_index + 1} {at.name}", refresh=False)
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in losses.items()}, "grad_norm": f"{grad_norm:.3g}"},
                             refresh=False)
        self.bar.update(1)
        record = {"step": done, "stage": at.name, "stage_index": at.stage_index, "run": at.run_index,
                  "anchor_losses": at.anchor_losses_on, **lrs, "grad_norm": grad_norm, **losses}
        if skipped:
            record["skipped"] = True  # non-finite loss or gradient: no update
        if self.damaged:
            record["damaged_samples_skipped"] = self.damaged
        if validation is not None:
            record["validation"] = validation
            for name, value in validation.items():  # every validation point, whatever train.log_every
                self.tb.add_scalar(f"validation/{name}", value, done)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if every and done % every == 0:
            for name, value in losses.items():
                self.tb.add_scalar(f"loss/{name}", value, done)
            for name, value in lrs.items():
                self.tb.add_scalar(f"lr/{name}", value, done)
            self.tb.add_scalar("grad_norm", grad_norm, done)

    def close(self) -> None:
        self.perf.close()
        if self.active:
            self.bar.close()
            self.tb.close()
            self.metrics.close()


def wait_for_a_later_event_file_name(tb_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the writer's
    second (events.out.tfevents.<seconds>.<host>.<pid>...). A run resumed within the second a killed
    run started would sort by pid, possibly before the killed run's file, whose restart marker then
    hides the resumed points; waiting for the next second keeps the resumed file last."""
    seconds = [int(match.group(1)) for f in tb_dir.glob("events.out.tfevents.*")
               if (match := re.match(r"events\.out\.tfevents\.(\d+)\.", f.name))]
    if seconds and max(seconds) >= int(time.time()):
        time.sleep(max(seconds) + 1 - time.time())


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` (metrics.jsonl) up to optimizer step ``step``, rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]  # a cut last line goes
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

