"""The CoVT training loop: four stages, a LoRA merge after each run, the final folder.

Read top to bottom. ``train`` sets up where this rank runs (``covt.compute``), then
``start_job`` (schedule, cache, base model, heads, validation samples, resume point); for
each run (the stages between two merges) ``train_run``: ``RunModel.build`` (the run's base +
a fresh LoRA + the thought tokens + the heads, its optimizer), ``data_stream`` (this rank's
micro-batches from where the run left off), one ``optimizer_step`` per step (stage ->
micro-batches -> forward -> backward -> update -> validation -> log -> checkpoint), then
``merge_run``; ``export_final_model`` writes the final folder. All inside try/finally: the
logger closes and the process group is left on any exit. The stage of every batch comes
from ``schedule.stage_at(optimizer step)``, the data position and the torch seed (LoRA
dropout) from the optimizer step, so a resumed run sees exactly the stage, data and losses
of an uninterrupted one.
"""
from __future__ import annotations

import gc
import json
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from covt.compute import Compute, autocast, compute_cleanup, compute_init
from covt.config import Config, TrainConfig, save_config
from covt.fs import atomic_write
from shards.reader import Cache, StreamingDataset
from trainer.batch import BatchBuilder, batch_to
from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_rng,
    load_trainable,
    read_meta,
    save_checkpoint,
    trainable_state,
)
from trainer.export import export_final, merge_to_folder, remove_interrupted_writes
from trainer.heads import build_heads
from trainer.loading import load_processor, load_vlm
from trainer.lora import attach_lora, trainable_summary
from trainer.model import CoVTModel
from trainer.optim import learning_rates, make_optimizer, make_scheduler
from trainer.schedule import Run, Schedule
from trainer.settings import RunSettings
from trainer.tiny_model import ensure_base_model
from trainer.tokens import ThoughtTokens, add_thought_tokens
from trainer.validation import load_validation, validation_due, validation_losses
from trainer.vision_attention import use_varlen_vision_attention

MAX_GRAD_NORM = 1.0  # same as gradient_clipping in configs/deepspeed/*.json
# ranks wait at barriers while rank 0 alone merges a run or exports the final model (minutes for a 7B)
BARRIER_TIMEOUT = timedelta(hours=2)


def train(cfg: Config, resume: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or continue) the whole recipe; returns output_dir/final, or None when stopped by ``stop_after``."""
    t = cfg.train
    compute = compute_init(t.device, "train.device", BARRIER_TIMEOUT, group_of_one=bool(t.deepspeed))
    job = None
    try:
        if compute.world > 1 and not t.deepspeed:
            raise ValueError(f"{compute.world} processes but train.deepspeed is not set: several GPUs need "
                             "train.deepspeed=configs/deepspeed/zero2.json (or zero3.json)")
        job = start_job(cfg, RunSettings.resolve(cfg, compute.world), compute, resume)
        for run in job.schedule.runs:
            if job.step >= run.end:
                finish_merged_run(job, run)
            elif not train_run(job, run, stop_after):
                return None
        return export_final_model(job)
    finally:
        if job is not None:
            job.log.close()
        compute_cleanup(compute)


# ----------------------------------------------------------------------------- the job and its runs
@dataclass
class Job:
    """What lasts across the runs: the config, where this rank runs, the schedule, the heads, where we are."""

    cfg: Config
    settings: RunSettings  # derived from cfg once: grad_accum, what train.thoughts: false switches off
    compute: Compute
    schedule: Schedule
    out: Path
    cache: Cache
    base_path: Path
    hidden_size: int
    heads: torch.nn.ModuleDict
    validation: list  # data.validation's held-out samples, [] without
    checkpoint: Path | None  # the newest checkpoint, written or resumed from
    step: int  # optimizer steps done
    log: Logger
    guard: NonFiniteGuard

    def run_base(self, run: Run) -> Path:
        """The model a run starts from: the base model, or the previous run's merge."""
        return self.base_path if run.index == 0 else self.out / self.schedule.runs[run.index - 1].merged_name

    def autocast(self) -> torch.autocast:
        return autocast(self.compute.device, use_bf16(self.cfg.train, self.compute.device))


def start_job(cfg: Config, settings: RunSettings, compute: Compute, resume: bool) -> Job:
    """Set-up: schedule, cache, base model, heads, validation samples, and the checkpoint to resume from."""
    t, rank, world = cfg.train, compute.rank, compute.world
    schedule = Schedule(settings.stages)
    out = Path(t.output_dir)
    seed_everything(t.seed)
    # before any model: an unfinished or edited cache is said at once
    cache = Cache(cfg.cache.dir, **cfg.cache.cache_kwargs())
    base_path = ensure_base_model_on_rank0(cfg, compute)
    hidden_size = load_vlm_config(base_path).text_config.hidden_size
    heads = build_heads(list(settings.head_anchors), hidden_size, cache)
    validation = load_validation(cfg)
    if rank == 0:
        remove_interrupted_writes(out)  # temporary folders of a merge, export or checkpoint cut short
    compute.barrier()
    checkpoint = latest_checkpoint(out) if resume else None
    step = read_meta(checkpoint)["global_step"] if checkpoint else 0
    if checkpoint:  # heads carry over merges, so every checkpoint restores them
        load_heads(heads, load_file(checkpoint / "trainable.safetensors"), where=str(checkpoint))
    log = Logger(out, rank, schedule.total_steps, step)  # drops what a cut-short run logged after ``step``
    if rank == 0:
        save_config(cfg, out / "config.yaml")  # what this run (or this resumption of it) trains with
    log.info(f"schedule ({schedule.total_steps} optimizer steps, {t.batch_size} x {settings.grad_accum} x {world} "
             f"samples each):\n{schedule.describe()}")
    log.info(f"resuming from {checkpoint} at step {step}" if checkpoint else "starting from step 0")
    return Job(cfg, settings, compute, schedule, out, cache, base_path, hidden_size, heads, validation, checkpoint,
               step, log, NonFiniteGuard(t.max_nonfinite_steps, log))


def train_run(job: Job, run: Run, stop_after: int | None) -> bool:
    """The optimizer steps of ``run`` from ``job.step`` on, then its merge; False if ``stop_after`` stopped it."""
    rm = RunModel.build(job, run)
    loader = data_stream(job, rm)
    rm.model.train()
    for step in range(job.step, run.end):
        if stop_after is not None and step >= stop_after:
            job.log.info(f"stopping before step {step} (--stop-after {stop_after})")
            return False
        optimizer_step(job, rm, loader, step)
        job.step = step + 1
    del loader
    merge_run(job, run, rm)
    return True


@dataclass
class RunModel:
    """The model of one run (its base + a fresh LoRA + the thought tokens + the heads) and its optimizer."""

    processor: Any
    tokens: ThoughtTokens
    model: CoVTModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: Any  # the DeepSpeed engine, or None
    resumed_from: Path | None  # the checkpoint this run continues from, mid-way
    trainable: list[torch.nn.Parameter]  # what the optimizer updates (clipped together), listed once per run

    @classmethod
    def build(cls, job: Job, run: Run) -> RunModel:
        t, device = job.cfg.train, job.compute.device
        run_base = job.run_base(run)
        processor = load_processor(run_base)
        vlm = load_vlm(run_base, dtype=torch.bfloat16 if use_bf16(t, device) else torch.float32)
        tokens = add_thought_tokens(processor, vlm, seed=t.seed)
        if t.vision_attention == "varlen":
            use_varlen_vision_attention(vlm)
        if t.gradient_checkpointing:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(t.seed + 1000 * (run.index + 1))  # the fresh LoRA of each run is seeded
        vlm = attach_lora(vlm, t.lora, tokens.ids)
        model = CoVTModel(vlm, job.heads, tokens, t.loss_weights).to(device)
        optimizer = make_optimizer(model, t)
        scheduler = make_scheduler(optimizer, run.end - run.start, t.warmup_ratio)  # each run its own schedule
        engine = deepspeed_engine(model, optimizer, scheduler, t, job.settings.grad_accum, job.compute.world,
                                  device) if t.deepspeed else None
        job.log.info(f"run {run.index} (stages {[i + 1 for i in run.stage_indices]}) on {run_base}: "
                     f"{trainable_summary(model)}")
        resumed_from = job.checkpoint if job.checkpoint is not None and run.start < job.step < run.end else None
        if resumed_from is not None:
            load_checkpoint(resumed_from, model, optimizer, scheduler, engine, job.compute.rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return cls(processor, tokens, model, optimizer, scheduler, engine, resumed_from, trainable)


def data_stream(job: Job, rm: RunModel):
    """This rank's micro-batches, from the first sample the next optimizer step needs."""
    t, c = job.cfg.train, job.compute
    per_step = t.batch_size * job.settings.grad_accum
    dataset = StreamingDataset(job.cfg.cache.dir, job.cfg.anchors, seed=t.seed, rank=c.rank, world_size=c.world,
                               start=job.step * per_step, batch_size=t.batch_size, on_damaged=t.on_damaged_sample,
                               cache_kwargs=job.cfg.cache.cache_kwargs())
    # micro-batches are built in the loader's workers; the step and stage follow from each sample's position
    collate = BatchBuilder(job.schedule, per_step, rm.processor, rm.tokens, job.settings.batch,
                           rm.model.view_sizes())
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, num_workers=t.num_workers,
                                              collate_fn=collate, pin_memory=c.device.type == "cuda"))
    if rm.resumed_from is not None:  # after the loader took its seed, as the uninterrupted run's loader did
        load_rng(rm.resumed_from, c.rank)
    return loader


def optimizer_step(job: Job, rm: RunModel, loader, step: int) -> None:
    """One optimizer step: its stage, ``grad_accum`` micro-batches forward and backward, the update, the
    validation pass when one is due, the log line, and a checkpoint when one is due."""
    t, device, log, grad_accum = job.cfg.train, job.compute.device, job.log, job.settings.grad_accum
    log.start_clock()
    at = job.schedule.stage_at(step)
    torch.manual_seed(step_seed(t.seed, job.compute.rank, step))  # dropout etc. depend on the step, not on history
    losses: dict[str, torch.Tensor] = {}  # read once per optimizer step: a sync per backward stalls the GPU
    for _ in range(grad_accum):
        batch = next(loader)
        if batch["step"] != step:
            raise RuntimeError(f"the data stream is at optimizer step {batch['step']}, the loop at {step}")
        log.damaged_samples(batch["damaged_skipped"], step)
        with job.autocast():
            result = (rm.engine or rm.model)(batch_to(batch, device), at.anchor_losses_on)
        backward(result, rm.engine, grad_accum)
        for name, value in result.items():
            losses[name] = losses.get(name, 0) + value.detach().float() / grad_accum
    losses, grad_norm, applied = finish_step(losses, rm.engine, rm.optimizer, rm.scheduler, rm.trainable)
    done = step + 1
    validation = (validation_losses(rm.model, rm.engine or rm.model, job.validation, rm.processor, rm.tokens,
                                    job.settings, rm.model.view_sizes(), device, job.autocast)
                  if validation_due(job.cfg, done, job.validation) else None)
    log.step(done, at, losses, learning_rates(rm.optimizer), every=t.log_every, skipped=not applied,
             grad_norm=grad_norm, validation=validation)
    job.guard.check(done, applied, losses, grad_norm)
    if (t.save_every and done % t.save_every == 0) or job.schedule.is_stage_end(done):
        job.checkpoint = save_checkpoint(job.out, done, rm.model, meta=position(job.schedule, done),
                                         optimizer=rm.optimizer, scheduler=rm.scheduler, engine=rm.engine,
                                         rank=job.compute.rank, world_size=job.compute.world)


def merge_run(job: Job, run: Run, rm: RunModel) -> None:
    """Merge the run's LoRA into its base (the next run's base); the heads carry on as plain modules."""
    state = trainable_state(rm.model)  # gathered under ZeRO-3
    rm.engine = rm.model = rm.optimizer = rm.scheduler = None  # free the run's model before the merge loads one
    rm.trainable = []
    free_memory()
    # rebuilt: the engine may have partitioned or cast the old ones
    job.heads = build_heads(list(job.settings.head_anchors), job.hidden_size, job.cache)
    load_heads(job.heads, state, where=f"end of run {run.index}")
    if job.compute.rank == 0:
        job.log.info(f"merging run {run.index} into {job.out / run.merged_name}")
        merge_trained(job, run, state)
    job.compute.barrier()


def finish_merged_run(job: Job, run: Run) -> None:
    """A run trained before this session: redo its merge if the session that trained it was cut during it."""
    merged_dir = job.out / run.merged_name
    if (merged_dir / "config.json").is_file():
        return
    if job.checkpoint is None or job.step != run.end:
        raise FileNotFoundError(f"{merged_dir} is missing and no checkpoint at the end of run {run.index} "
                                f"(step {run.end}) is left to rebuild it; rerun with --no-resume")
    if job.compute.rank == 0:
        job.log.info(f"redoing the merge of run {run.index} from {job.checkpoint}")
        merge_trained(job, run, load_file(job.checkpoint / "trainable.safetensors"))
    job.compute.barrier()


def merge_trained(job: Job, run: Run, state: dict[str, torch.Tensor]) -> Path:
    """The run's base + its trained tensors (a CoVTModel trainable state) -> output_dir/<merged_name>."""
    return merge_to_folder(job.run_base(run), job.cfg.train.lora, vlm_tensors(state), job.out / run.merged_name,
                           token_seed=job.cfg.train.seed)


def export_final_model(job: Job) -> Path:
    """output_dir/final: the last merge and the heads, a folder plain transformers loads."""
    final, last = job.out / "final", job.out / job.schedule.runs[-1].merged_name
    if job.compute.rank == 0:
        tokens = add_thought_tokens(load_processor(last))
        export_final(last, job.heads, tokens, job.cfg.train.loss_weights, final)
        job.log.info(f"final model: {final} (= {last.name} + covt_heads)")
    job.compute.barrier()
    return final


# ----------------------------------------------------------------------------- pieces of the loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def ensure_base_model_on_rank0(cfg: Config, compute: Compute) -> Path:
    if compute.rank == 0:
        ensure_base_model(cfg.model)
    compute.barrier()
    return ensure_base_model(cfg.model)


def load_vlm_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def use_bf16(t: TrainConfig, device: torch.device) -> bool:
    return t.bf16 and device.type == "cuda"


def deepspeed_engine(model, optimizer, scheduler, t: TrainConfig, grad_accum: int, world: int,
                     device: torch.device):
    import deepspeed

    with open(t.deepspeed) as f:
        ds_config = json.load(f)
    ds_config["train_micro_batch_size_per_gpu"] = t.batch_size
    ds_config["gradient_accumulation_steps"] = grad_accum
    # the engine computes the gradient norm only when it clips; its non-finite check (our skip) needs that norm
    ds_config.setdefault("gradient_clipping", MAX_GRAD_NORM)
    ds_config["train_batch_size"] = t.batch_size * grad_accum * world
    ds_config.setdefault("bf16", {})["enabled"] = use_bf16(t, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def position(schedule: Schedule, done: int) -> dict:
    """Where a checkpoint after ``done`` optimizer steps sits in the schedule (for people reading it)."""
    at = schedule.stage_at(done - 1)
    return {"stage": at.name, "stage_index": at.stage_index, "run_index": at.run_index,
            "step_in_run": at.step_in_run + 1, "stage_end": schedule.is_stage_end(done)}


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

    def __init__(self, limit: int, log: Logger):
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
        atomic_write(path, "".join(kept).encode())

