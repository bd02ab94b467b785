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

import functools
import gc
import itertools
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from covt.compute import Compute, autocast, compute_cleanup, compute_init, use_tf32
from covt.config import Config, TrainConfig
from shards.reader import Cache, StreamingDataset
from trainer.batch import BatchBuilder, batch_to
from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_rng,
    load_trainable,
    named_checkpoint,
    read_meta,
    remove_checkpoints_after,
    save_checkpoint,
    trainable_state,
)
from trainer.deepspeed_config import read_deepspeed_json, resolve_deepspeed_config
from trainer.export import export_final, merge_to_folder, remove_interrupted_writes
from trainer.heads import build_heads, init_like_missing_keys, uses_projection_lr
from trainer.loading import load_processor, load_vlm
from trainer.lora import attach_lora, stop_token_row_gradients, trainable_summary
from trainer.metrics import MetricsLogger
from trainer.model import CARRIED_ROWS, CoVTModel, compile_blocks
from trainer.optim import learning_rates, make_optimizer, make_scheduler
from trainer.run_folder import config_changes, keep_launch_config, run_folder_lock
from trainer.schedule import Run, Schedule
from trainer.settings import RunSettings
from trainer.step_graphs import MicroBatchGraphs, cuda_graph_advice, cuda_graph_problems
from trainer.text_attention import use_packed_text_attention
from trainer.tiny_model import ensure_base_model
from trainer.tokens import ThoughtTokens, add_thought_tokens
from trainer.validation import load_validation, validation_due, validation_losses
from trainer.vision_attention import use_varlen_vision_attention

logger = logging.getLogger(__name__)


def train(cfg: Config, resume: bool | str | Path = True, stop_after: int | None = None,
          allow_config_change: bool = False) -> Path | None:
    """Run (or continue) the whole recipe; returns output_dir/final, or None when stopped by ``stop_after``.
    ``resume``: True, the newest checkpoint; False, step 0; a path, that checkpoint of output_dir (the later
    ones are deleted: this run rewrites them). ``allow_config_change``: resume even if the config differs
    from the run's (trainer.run_folder)."""
    t = cfg.train
    lock = run_folder_lock(t.output_dir)  # one trainer per output_dir
    compute = compute_init(t.device, "train.device", timedelta(minutes=t.collective_timeout_minutes),
                           group_of_one=bool(t.deepspeed))
    job = None
    try:
        problems = cuda_graph_problems(cfg, compute.device) if t.cuda_graphs else []
        if problems:
            raise ValueError("train.cuda_graphs: " + "; ".join(problems))
        for advice in cuda_graph_advice(cfg) if t.cuda_graphs else []:
            logger.warning("train.cuda_graphs: %s", advice)
        if t.compile_mode != "default" and not t.compile:
            logger.warning("train.compile_mode=%s has no effect without train.compile=true", t.compile_mode)
        use_tf32(t.tf32)
        lock.acquire()
        job = start_job(cfg, RunSettings.resolve(cfg, compute.world), compute, resume, allow_config_change)
        for run in job.schedule.runs:
            if job.step >= run.end:
                finish_merged_run(job, run)
            elif not train_run(job, run, stop_after):
                return None
        return export_final_model(job)
    finally:
        if job is not None:
            job.log.close()
        lock.release()
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
    log: MetricsLogger
    guard: NonFiniteGuard
    head_init_std: float = 0.02  # the VLM config's initializer_range (train.head_init: transformers)

    def run_base(self, run: Run) -> Path:
        """The model a run starts from: the base model, or the previous run's merge."""
        return self.base_path if run.index == 0 else self.out / self.schedule.runs[run.index - 1].merged_name

    def autocast(self) -> torch.autocast:
        return autocast(self.compute.device, use_bf16(self.cfg.train, self.compute.device))


def start_job(cfg: Config, settings: RunSettings, compute: Compute, resume: bool | str | Path,
              allow_config_change: bool = False) -> Job:
    """Set-up: schedule, cache, base model, heads, validation samples, and the checkpoint to resume from."""
    t, rank, world = cfg.train, compute.rank, compute.world
    schedule = Schedule(settings.stages)
    out = Path(t.output_dir)
    # before any work: a resumed run under another config is refused (every rank decides alike)
    changes = config_changes(cfg, out, resume and latest_checkpoint(out) is not None, allow_config_change)
    seed_everything(t.seed)
    # before any model: an unfinished or edited cache is said at once
    cache = Cache(cfg.cache.dir, **cfg.cache.cache_kwargs())
    base_path = ensure_base_model_on_rank0(cfg, compute)
    vlm_config = load_vlm_config(base_path)
    hidden_size = vlm_config.text_config.hidden_size
    heads = build_job_heads(cfg, settings, hidden_size, cache, initializer_range(vlm_config))
    validation = load_validation(cfg)
    if rank == 0:
        remove_interrupted_writes(out)  # temporary folders of a merge, export or checkpoint cut short
    checkpoint = resume_point(out, resume, rank)
    compute.barrier()
    step = read_meta(checkpoint)["global_step"] if checkpoint else 0
    if checkpoint:  # heads carry over merges, so every checkpoint restores them
        load_heads(heads, load_file(checkpoint / "trainable.safetensors"), where=str(checkpoint))
    # drops what a cut-short run logged after ``step``; continues its tracker runs (trackers.json) when resuming
    log = MetricsLogger(cfg, out, rank, schedule.total_steps, step, t.batch_size * settings.grad_accum * world)
    if rank == 0:
        keep_launch_config(cfg, out)  # what this run (or this resumption of it) trains with
    if changes:
        log.info(f"resuming with a changed config (--allow-config-change): {changes}")
    log.info(f"schedule ({schedule.total_steps} optimizer steps, {t.batch_size} x {settings.grad_accum} x {world} "
             f"samples each):\n{schedule.describe()}")
    log.info(f"resuming from {checkpoint} at step {step}" if checkpoint else "starting from step 0")
    return Job(cfg, settings, compute, schedule, out, cache, base_path, hidden_size, heads, validation, checkpoint,
               step, log, NonFiniteGuard(t.max_nonfinite_steps, log), initializer_range(vlm_config))


def train_run(job: Job, run: Run, stop_after: int | None) -> bool:
    """The optimizer steps of ``run`` from ``job.step`` on, then its merge; False if ``stop_after`` stopped it."""
    rm = RunModel.build(job, run)
    loader = data_stream(job, rm, run)
    rm.model.train()
    for step in range(job.step, run.end):
        if stop_after is not None and step >= stop_after:
            job.log.info(f"stopping before step {step} (--stop-after {stop_after})")
            return False
        at = job.schedule.stage_at(step)
        with naming_a_stuck_collective(job, f"optimizer step {step + 1} of {job.schedule.total_steps} (stage "
                                            f"{at.stage_index + 1} {at.name}, run {at.run_index})"):
            optimizer_step(job, rm, loader, step)
        job.step = step + 1
    del loader
    with naming_a_stuck_collective(job, f"the merge of run {run.index} (after optimizer step {run.end})"):
        merge_run(job, run, rm)
    return True


class CollectiveTimeout(RuntimeError):
    """A rank waited longer than train.collective_timeout_minutes for the others."""


def is_collective_timeout(e: BaseException) -> bool:
    """gloo's "Timed out waiting ..." (a plain RuntimeError naming gloo) or a torch.distributed error about a
    timeout (NCCL's watchdog); not a timeout of anything else (a storage read, say)."""
    text = str(e).lower()
    return (not isinstance(e, CollectiveTimeout) and ("timed out" in text or "timeout" in text)
            and (isinstance(e, torch.distributed.DistError) or "gloo" in text))


@contextmanager
def naming_a_stuck_collective(job: Job, where: str):
    """Any failure inside says which rank failed where; a collective that timed out (gloo raises it; NCCL's
    own watchdog, with TORCH_NCCL_ASYNC_ERROR_HANDLING, may end the process first) becomes a
    :class:`CollectiveTimeout` naming the rank, the step and the stage instead of gloo's bare message."""
    c = job.compute
    try:
        yield
    except RuntimeError as e:
        if c.world > 1 and is_collective_timeout(e):
            minutes = job.cfg.train.collective_timeout_minutes
            raise CollectiveTimeout(
                f"rank {c.rank} of {c.world} waited more than {minutes:g} minutes "
                f"(train.collective_timeout_minutes) for the other ranks at {where}: another rank stopped, hung "
                f"or is slower than that bound; its own log says which ({str(e).splitlines()[0]})") from e
        e.add_note(f"rank {c.rank} of {c.world}, at {where}")
        raise


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
    graphs: MicroBatchGraphs | None = None  # train.cuda_graphs: the micro-batches' recorded forward and backward

    @classmethod
    def build(cls, job: Job, run: Run) -> RunModel:
        t, device = job.cfg.train, job.compute.device
        run_base = job.run_base(run)
        processor = load_processor(run_base)
        vlm = load_vlm(run_base, dtype=torch.bfloat16 if use_bf16(t, device) else torch.float32)
        tokens = add_thought_tokens(processor, vlm, seed=t.seed)
        if t.vision_attention == "varlen":
            use_varlen_vision_attention(vlm)
        if t.packing:
            use_packed_text_attention(vlm)
        if t.gradient_checkpointing:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(t.seed + 1000 * (run.index + 1))  # the fresh LoRA of each run is seeded
        vlm = attach_lora(vlm, t.lora, tokens.ids)
        if t.new_token_rows == "first_run" and run.index > 0:
            stop_token_row_gradients(vlm)  # the reference's row mask is empty after the first merge: decay only
        if t.compile:
            blocks = compile_blocks(vlm, t.compile_mode)
            job.log.info(f"train.compile: {len(blocks)} blocks compile at their first shapes ({t.compile_mode})")
        # under DeepSpeed every head runs at every micro-batch (CoVTModel.placeholder_part says why)
        model = CoVTModel(vlm, job.heads, tokens, t.loss_weights, every_head=bool(t.deepspeed)).to(device)
        model.padding_mask = t.padding_mask
        if t.compile_heads:
            model.compile_heads()
            job.log.info(f"train.compile_heads: {len(model.heads)} heads compile at their first shapes")
        optimizer = make_optimizer(model, t)
        scheduler = make_scheduler(optimizer, run.end - run.start, t.warmup_ratio)  # each run its own schedule
        engine = (deepspeed_engine(model, optimizer, scheduler, t, job.settings.grad_accum, job.compute.world, device,
                                   job.hidden_size, run.end - run.start) if t.deepspeed else None)
        job.log.info(f"run {run.index} (stages {[i + 1 for i in run.stage_indices]}) on {run_base}: "
                     f"{trainable_summary(model)}")
        resumed_from = job.checkpoint if job.checkpoint is not None and run.start < job.step < run.end else None
        if resumed_from is not None:
            load_checkpoint(resumed_from, model, optimizer, scheduler, engine, job.compute.rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if engine is None:
            same_start_on_every_rank(trainable, job.compute.world)
        graphs = (MicroBatchGraphs(functools.partial(graphed_micro_batch, model, job.settings.grad_accum, job.autocast),
                                   trainable, device) if t.cuda_graphs else None)
        return cls(processor, tokens, model, optimizer, scheduler, engine, resumed_from, trainable, graphs)


def run_stream(cfg: Config, per_step: int, rank: int, world: int, step: int, run: Run,
               per_item: int | None = None) -> tuple[StreamingDataset, int]:
    """This rank's sample stream from optimizer ``step`` of ``run`` on, and the step at its position 0; each
    loader worker reads ``per_item`` samples in turn (train.batch_size unless given).

    train.data_order restart_each_run: each run reads the stream from its first sample, as each of the
    reference's run.sh calls shuffles the data anew with the same seed (data.py 393, 426-429)."""
    t = cfg.train
    stream_start = run.start if t.data_order == "restart_each_run" else 0
    dataset = StreamingDataset(cfg.cache.dir, cfg.anchors, seed=t.seed, rank=rank, world_size=world,
                               start=(step - stream_start) * per_step, batch_size=per_item or t.batch_size,
                               on_damaged=t.on_damaged_sample, cache_kwargs=cfg.cache.cache_kwargs())
    return dataset, stream_start


def data_stream(job: Job, rm: RunModel, run: Run):
    """This rank's micro-batches, from the first sample the next optimizer step needs."""
    t, c = job.cfg.train, job.compute
    per_step = t.batch_size * job.settings.grad_accum
    by_length = t.sort_step_by_length and job.settings.grad_accum > 1  # a loader item: a step's micro-batches
    if t.sort_step_by_length and not by_length:
        job.log.info("train.sort_step_by_length: one micro-batch per optimizer step on each GPU, nothing to sort")
    per_item = per_step if by_length else t.batch_size
    dataset, stream_start = run_stream(job.cfg, per_step, c.rank, c.world, job.step, run, per_item)
    # micro-batches are built in the loader's workers; the step and stage follow from each sample's position
    collate = BatchBuilder(job.schedule, per_step, rm.processor, rm.tokens, job.settings.batch,
                           rm.model.view_sizes(), first_step=stream_start, vision=rm.model.vision_geometry(),
                           micro_batches=job.settings.grad_accum if by_length else None)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=per_item, num_workers=t.num_workers,
                                              collate_fn=collate, pin_memory=c.device.type == "cuda"))
    if by_length:
        loader = itertools.chain.from_iterable(loader)
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
        batch = log.next_batch(loader)
        if batch["step"] != step:
            raise RuntimeError(f"the data stream is at optimizer step {batch['step']}, the loop at {step}")
        log.damaged_samples(batch["damaged_skipped"], step)
        if rm.graphs is not None:
            result = rm.graphs(batch, at.anchor_losses_on)  # forward and backward: one replay
        else:
            with job.autocast():
                result = (rm.engine or rm.model)(batch_to(batch, device), at.anchor_losses_on)
            backward(result, rm.engine, grad_accum)
        for name, value in result.items():
            losses[name] = losses.get(name, 0) + value.detach().float() / grad_accum
    if rm.graphs is not None:
        log.graphs_recorded(rm.graphs.recordings)
    losses = mean_over_ranks(losses, ["loss", "text", *rm.model.heads], job.compute.world)
    if rm.engine is None and job.compute.world > 1:
        average_gradients(rm.trainable, job.compute.world)
    losses, grad_norm, applied = finish_step(losses, rm.engine, rm.optimizer, rm.scheduler, rm.trainable,
                                             clip_norm(t))
    losses = carried_parts(losses)
    done = step + 1
    validation = (validation_losses(rm.model, rm.engine or rm.model, job.validation, rm.processor, rm.tokens,
                                    job.settings, device, job.autocast)
                  if validation_due(job.cfg, done, job.validation) else None)
    log.step(done, at, losses, learning_rates(rm.optimizer), every=t.log_every, skipped=not applied,
             grad_norm=grad_norm, validation=validation)
    job.guard.check(done, applied, losses, grad_norm)
    if (t.save_every and done % t.save_every == 0) or job.schedule.is_stage_end(done):
        job.checkpoint = save_checkpoint(job.out, done, rm.model, meta=position(job.schedule, done),
                                         optimizer=rm.optimizer, scheduler=rm.scheduler, engine=rm.engine,
                                         rank=job.compute.rank, world_size=job.compute.world,
                                         keep=t.save_total_limit)


def merge_run(job: Job, run: Run, rm: RunModel) -> None:
    """Merge the run's LoRA into its base (the next run's base); the heads carry on as plain modules."""
    state = trainable_state(rm.model)  # gathered under ZeRO-3
    # free the run's model, and its CUDA graphs' memory, before the merge loads one
    rm.engine = rm.model = rm.optimizer = rm.scheduler = rm.graphs = None
    rm.trainable = []
    free_memory()
    # rebuilt: the engine may have partitioned or cast the old ones
    job.heads = build_job_heads(job.cfg, job.settings, job.hidden_size, job.cache, job.head_init_std)
    load_heads(job.heads, state, where=f"end of run {run.index}")
    if job.compute.rank == 0:
        job.log.info(f"merging run {run.index} into {job.out / run.merged_name}")
        merge_trained(job, run, state)
    job.compute.barrier()


def resume_point(out: Path, resume: bool | str | Path, rank: int) -> Path | None:
    """The checkpoint to resume from (see ``train``); rank 0 deletes those after a named one."""
    if resume is True or resume is False:
        return latest_checkpoint(out) if resume else None
    checkpoint = named_checkpoint(out, resume)
    if rank == 0:
        for later in remove_checkpoints_after(out, read_meta(checkpoint)["global_step"]):
            logger.warning(f"--resume {checkpoint.name}: deleted the later checkpoint {later} (this run rewrites it)")
    return checkpoint


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


def build_job_heads(cfg: Config, settings: RunSettings, hidden_size: int, cache: Cache,
                    init_std: float) -> torch.nn.ModuleDict:
    """The heads as train.head_init and train.trained_head_parameters say. Built from train.seed alone, so a
    part left frozen comes out the same at every build (start, resume, after a merge), never saved."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        heads = build_heads(list(settings.head_anchors), hidden_size, cache)
        if cfg.train.head_init == "transformers":
            init_like_missing_keys(heads, init_std)
    if "sam" in heads:
        heads["sam"].matching = cfg.train.sam_matching
    if cfg.train.trained_head_parameters == "projection_query_attention":
        # the reference re-enables only these names after get_peft_model froze everything (train.py 255-261)
        for name, p in heads.named_parameters():
            p.requires_grad_(uses_projection_lr(name))
    return heads


def initializer_range(vlm_config) -> float:
    """The std transformers initialises a model's missing Linear weights with (Qwen2.5-VL: 0.02)."""
    value = getattr(vlm_config, "initializer_range", None)
    return float(value if value is not None else vlm_config.text_config.initializer_range)


def clip_norm(t: TrainConfig) -> float:
    """train.max_grad_norm, or inf when clipping is off: the norm is still computed (log, non-finite check)."""
    return float(t.max_grad_norm) if t.max_grad_norm else math.inf


def load_vlm_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def use_bf16(t: TrainConfig, device: torch.device) -> bool:
    return t.bf16 and device.type == "cuda"


def deepspeed_engine(model, optimizer, scheduler, t: TrainConfig, grad_accum: int, world: int,
                     device: torch.device, hidden_size: int, run_steps: int):
    import deepspeed

    config = deepspeed_config(t, world, device, hidden_size, run_steps, grad_accum)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def deepspeed_config(t: TrainConfig, world: int, device: torch.device, hidden_size: int = 0,
                     run_steps: int = 0, grad_accum: int | None = None) -> dict:
    """train.deepspeed's JSON with the batch sizes, clipping and bf16 this config says ("auto" filled as Hugging
    Face Trainer fills it). train.max_grad_norm owns clipping; off, the engine still clips at inf: it computes
    the gradient norm only when it clips, and its non-finite check (our skip) needs that norm."""
    return resolve_deepspeed_config(read_deepspeed_json(t.deepspeed), t, world, use_bf16(t, device), clip_norm(t),
                                    hidden_size, run_steps, grad_accum=grad_accum)


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


def graphed_micro_batch(model: CoVTModel, grad_accum: int, autocast_context, batch: dict,
                        anchor_losses: bool) -> dict[str, torch.Tensor]:
    """What train.cuda_graphs records per micro-batch layout: the forward and backward of one micro-batch of
    ``grad_accum`` (as :func:`backward` without DeepSpeed, which train.cuda_graphs excludes)."""
    with autocast_context():
        result = model(batch, anchor_losses)
    backward(result, None, grad_accum)
    return {name: value.detach() for name, value in result.items()}


def carried_parts(losses: dict[str, float]) -> dict[str, float]:
    """The step's losses without the row counts of parts over every row (trainer.model.CARRIED_ROWS), and without
    the parts of anchors that no row of the step carried."""
    carried = {name[:-len(CARRIED_ROWS)]: value for name, value in losses.items() if name.endswith(CARRIED_ROWS)}
    return {name: value for name, value in losses.items()
            if not name.endswith(CARRIED_ROWS) and carried.get(name, 1) > 0}


def mean_over_ranks(losses: dict[str, torch.Tensor], names: list[str], world: int) -> dict[str, torch.Tensor]:
    """The step's losses over the whole global batch, as one process holding all of it logs them: each rank's
    mean over its micro-batches, averaged over the ranks. A part (an anchor) is kept when a micro-batch of any
    rank had it; a rank without it adds zero, as a micro-batch without it does in one process."""
    if world == 1:
        return losses
    device = losses["loss"].device
    values = torch.stack([losses.get(n, torch.zeros((), device=device)).float() for n in names]
                         + [torch.tensor(float(n in losses), device=device) for n in names])
    torch.distributed.all_reduce(values)
    return {n: values[i] / world for i, n in enumerate(names) if values[len(names) + i] > 0}


def average_gradients(trainable: list[torch.nn.Parameter], world: int) -> None:
    """Data parallel without DeepSpeed (several processes, ``train.deepspeed: null``): each trainable parameter's
    gradient becomes its mean over the ranks, what one process accumulating every rank's micro-batches holds, in
    one all-reduce per dtype at the end of the accumulation. A parameter this rank's micro-batches left without a
    gradient (a head none of them ran) takes part as zeros and receives the mean; one that no rank's did stays
    without one, so the optimizer passes it over as it does in one process."""
    had = torch.tensor([float(p.grad is not None) for p in trainable], device=trainable[0].device)
    torch.distributed.all_reduce(had)
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in trainable}, key=str):
        grads = [p.grad for p in trainable if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))
    for p, ranks in zip(trainable, had.tolist()):
        if ranks == 0:
            p.grad = None


def same_start_on_every_rank(trainable: list[torch.nn.Parameter], world: int) -> None:
    """Data parallel without DeepSpeed: rank 0's trainable values on every rank (each rank seeds the same fresh
    LoRA and heads, and a resumed run loads the same checkpoint; this makes sure, as DDP does)."""
    if world > 1:
        for p in trainable:
            torch.distributed.broadcast(p.data, src=0)


def finish_step(losses: dict[str, torch.Tensor], engine, optimizer, scheduler,
                trainable, max_norm: float) -> tuple[dict[str, float], float, bool]:
    """End an optimizer step: (the step's mean losses, gradient norm before clipping, whether the update was
    applied), read from the device in one sync. A non-finite loss or gradient skips the update and the lr
    scheduler (as DeepSpeed does), never the step. Under train.cuda_graphs the freed gradients come back zeroed
    at the next micro-batch (trainer.step_graphs.MicroBatchGraphs.install_gradients)."""
    if engine is not None:
        values = dict(zip(losses, torch.stack(list(losses.values())).tolist()))
        norm = engine.get_global_grad_norm()
        return values, float("nan") if norm is None else float(norm), engine.was_step_applied()
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
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

    def __init__(self, limit: int, log: MetricsLogger):
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
