"""Whole micro-batch CUDA graphs: a micro-batch's forward and backward recorded once per batch layout, then replayed.

At micro-batches of 1 and 2 the step waits on the host: it launches some 7,300 kernels per micro-batch (the compiled
blocks' forward and backward, the adapters' products, the heads) and the GPU idles between them. A CUDA graph of
the whole forward and backward is one launch. What a graph needs, and what :class:`MicroBatchGraphs` keeps:

- the same layout at every replay: one graph per :func:`layout` (the batch's tensor shapes and dtypes and the
  values the model reads on the host: flags, the vision tower's longest window); the batch's tensor values are
  copied into the graph's input tensors before each replay (:class:`InputBuffers`, shared between graphs). Few
  layouts: tokens padded to ``train.pad_to_multiple_of``, and each anchor's part over every row of the micro-batch
  (``BatchSettings.every_anchor_row``), so which samples drew thoughts changes values, not shapes;
- no read of the GPU by the host inside it, and no copy from pageable host memory (capture fails on either): the
  loader's inputs (trainer.host_inputs), ``train.sam_matching: device``, the thought-token rows' indices made once
  (trainer.lora.use_separate_token_rows); what is made once per device is made in the warm-ups;
- the gradients in place: the graphs add into gradient tensors this module owns and gives the parameters, so
  the backward accumulates micro-batches as a direct one does (a ``zero_grad()`` to None gets them back zeroed);
- warm-up runs before the capture (the compiled blocks compile, cuBLAS makes its workspaces) on a side stream;
  the gradients they leave are put back, so a capture does not change the step it happens in;
- one memory pool for the warm-ups and all the graphs: a warm-up's forward activations reuse what the graphs
  recorded so far free between replays, so a new layout needs no second activation peak beside theirs (at 7B,
  micro-batch 2, one pool for the graphs and the warm-ups' activations outside it ran out of an H100's 80 GB). The
  warm-ups' backward allocates from autograd's own thread, which the pool does not route: what it leaves cached
  outside the pool is given back to the device before each capture. The very first warm-up runs
  outside the pool, so that what the model makes once on first use lives in ordinary memory. A later warm-up must
  leave nothing allocated that an earlier graph could overwrite: when one does (a cache made on first use), the
  earlier graphs are dropped and recorded again.

Dropout draws new masks at each replay (the graph advances the CUDA generator's offset), as eager steps do.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covt.config import Config

logger = logging.getLogger(__name__)

# a train.pad_to_multiple_of from which the padding costs what the graphs save (cuda_graph_advice)
LARGE_PAD_MULTIPLE = 128
# entries of a batch that name or count its samples for logs and are not read by the model
NOT_READ_BY_THE_MODEL = frozenset({"keys", "step", "damaged_skipped"})


def layout(batch: Any) -> tuple:
    """What a recorded graph of ``batch`` depends on besides its tensors' values: each tensor's place in the
    batch, shape and dtype, and every other value the model may read on the host."""
    if isinstance(batch, torch.Tensor):
        return ("tensor", tuple(batch.shape), batch.dtype)
    if isinstance(batch, dict):
        return tuple((key, layout(value)) for key, value in sorted(batch.items())
                     if key not in NOT_READ_BY_THE_MODEL)
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, *(layout(value) for value in batch))
    hash(batch)  # a value that cannot key a graph is a batch this module cannot serve: say so here
    return ("value", batch)


def cuda_graph_problems(cfg: Config, device: torch.device) -> list[str]:
    """Why train.cuda_graphs cannot run with ``cfg`` on ``device`` (empty: it can), in one process or several."""
    t = cfg.train
    problems = []
    if device.type != "cuda":
        problems.append(f"CUDA graphs need a CUDA device (train.device resolves to {device})")
    if t.deepspeed:
        problems.append("DeepSpeed reduces gradients on the host during the backward, which a graph cannot hold: set "
                        "train.deepspeed=null (on several GPUs the gradients are then averaged once per optimizer "
                        "step, after the graphs)")
    if t.packing:
        problems.append("a packed micro-batch's sample lengths make a layout of their own: set train.packing=false")
    if "sam" in cfg.anchors and t.thoughts and t.sam_matching != "device":
        problems.append("the SAM head's scipy matching reads the GPU from the host, which a graph cannot hold: "
                        "set train.sam_matching=device")
    if t.lora.recompute_dropout:
        problems.append("the adapters' recomputed dropout reads and restores the CUDA random state in the backward "
                        "pass and has not run inside a graph: set train.lora.recompute_dropout=false")
    return problems


def cuda_graph_advice(cfg: Config) -> list[str]:
    """What would make train.cuda_graphs run better with ``cfg`` (it runs as it is)."""
    multiple = cfg.train.pad_to_multiple_of
    if multiple == 1:
        return ["train.pad_to_multiple_of is 1: every micro-batch token count that occurs is recorded as a graph of "
                "its own (two warm-ups and a capture each); a multiple such as 64 makes few of them, with the same "
                "loss and gradients"]
    if multiple >= LARGE_PAD_MULTIPLE:
        return [f"train.pad_to_multiple_of is {multiple}: the padded tokens cost what the graphs save (at 7B on an "
                "H100, multiples of 128 padded micro-batch 4 to 14% of its tokens against 4%, and the graphed step "
                "ran 0.99x the direct one; BENCHMARKS.md); a smaller multiple records more layouts, each once. "
                "perf-rank0.jsonl's padding_fraction shows this run's share"]
    return []


def copy_into(static: Any, batch: Any) -> None:
    """Copy every tensor of ``batch`` into the tensor at the same place of ``static`` (same layout)."""
    if isinstance(static, torch.Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, dict):
        for key, value in static.items():
            copy_into(value, batch[key])
    elif isinstance(static, (list, tuple)):
        for mine, theirs in zip(static, batch):
            copy_into(mine, theirs)


class InputBuffers:
    """The device tensors the recorded graphs read their batches from: one per place in the batch, shape and dtype,
    shared by every graph that has a tensor of that shape there (a replay's batch is copied in just before it).
    Graphs of micro-batches that differ only in token count thus share the large per-sample tensors (pixel
    values, the anchors' targets) instead of holding one copy each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tensors: dict[tuple, torch.Tensor] = {}

    def like(self, batch: Any, place: tuple = ()) -> Any:
        """``batch`` with each tensor replaced by the buffer of its place, shape and dtype (made at first use)."""
        if isinstance(batch, torch.Tensor):
            key = (place, tuple(batch.shape), batch.dtype)
            if key not in self.tensors:
                self.tensors[key] = torch.empty(batch.shape, dtype=batch.dtype, device=self.device)
            return self.tensors[key]
        if isinstance(batch, dict):
            return {key: self.like(value, (*place, key)) for key, value in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.like(value, (*place, i)) for i, value in enumerate(batch))
        return batch


@dataclass
class RecordedMicroBatch:
    graph: torch.cuda.CUDAGraph
    inputs: Any  # the batch tensors the graph reads, on the device
    outputs: dict[str, torch.Tensor]  # what the recorded run returned, rewritten at each replay


class MicroBatchGraphs:
    """Runs ``run(batch, *settings) -> dict of detached tensors`` (a micro-batch's forward and ``backward``) as a
    CUDA graph per batch layout and settings: the first micro-batch of each is warmed up ``warmup`` times and
    recorded, then every later one replays it. Graphs share one memory pool (they never run at once).

    ``params``: the trainable parameters. Their gradients are this object's tensors, which every graph adds into.
    Clearing them with ``zero_grad()`` (to None) is fine: the next call gives them back, zeroed; a gradient
    replaced by another tensor is an error."""

    def __init__(self, run: Callable[..., dict[str, torch.Tensor]], params: list[nn.Parameter],
                 device: torch.device, warmup: int = 2):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.run, self.params, self.device, self.warmup = run, list(params), device, warmup
        self.gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.graphs: dict[tuple, RecordedMicroBatch] = {}
        self.pool = torch.cuda.MemPool()
        self.pool_used = False  # the first recording's first warm-up runs outside the pool
        self.stream = torch.cuda.Stream(device)  # warm-ups and captures: where the pool's freed blocks are reused
        self.inputs = InputBuffers(device)
        self.recordings = 0  # graphs recorded so far (a layout recorded again counts again): each costs warm-ups

    def __call__(self, batch: Any, *settings) -> dict[str, torch.Tensor]:
        """The outputs of ``run(batch, *settings)`` on ``batch`` (a host batch, pinned for an asynchronous copy), as
        fresh tensors. ``settings``: hashable arguments of ``run`` that its graph is recorded with."""
        self.install_gradients()
        key = (layout(batch), settings)
        recorded = self.graphs.get(key)
        if recorded is None:
            try:
                recorded = self.graphs[key] = self.record(batch, settings)  # its inputs hold the batch already
                self.recordings += 1
            except torch.OutOfMemoryError as error:
                raise torch.OutOfMemoryError(
                    f"{error}\nwhile recording micro-batch CUDA graph {len(self.graphs) + 1} (train.cuda_graphs), its "
                    f"pool holding {self.pool_bytes() / 2**30:.1f} GiB: a smaller train.batch_size, or a larger "
                    "train.pad_to_multiple_of (fewer layouts), or train.cuda_graphs=false") from error
            logger.info("micro-batch CUDA graphs: %d recorded, their memory pool %.1f GiB", len(self.graphs),
                        self.pool_bytes() / 2**30)
        else:
            copy_into(recorded.inputs, batch)
        recorded.graph.replay()
        return {name: value.clone() for name, value in recorded.outputs.items()}

    def pool_bytes(self) -> int:
        """Device memory the graphs' pool holds (its segments): the recorded activations, which a step's allocation
        statistics do not show, as a replay allocates nothing."""
        return sum(segment["total_size"] for segment in self.pool.snapshot())

    def pool_allocated(self) -> int:
        """Bytes of the pool's blocks in use (not those freed and waiting for a stream to pass them)."""
        return sum(block["size"] for segment in self.pool.snapshot() for block in segment["blocks"]
                   if block["state"] == "active_allocated")

    def install_gradients(self) -> None:
        """Make this object's tensors the parameters' gradients: the graphs add into them and nowhere else."""
        if all(p.grad is grad for p, grad in zip(self.params, self.gradients)):
            return
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("a parameter's .grad was replaced while its micro-batch CUDA graphs add into "
                               "another tensor; clear gradients with zero_grad(set_to_none=False)")
        for p, grad in zip(self.params, self.gradients):
            p.grad = grad.zero_()

    def release(self) -> None:
        """Drop every recorded graph and give their pool's memory back to the device; the next call records again."""
        self.graphs.clear()
        self.inputs = InputBuffers(self.device)
        self.pool, self.pool_used = torch.cuda.MemPool(), False
        self.release_cached()

    def release_cached(self) -> None:
        """Give the caching allocator's free blocks outside the pool back to the device, so that the capture can grow
        the pool into them. The graphs' pool keeps its own."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def record(self, batch: Any, settings: tuple) -> RecordedMicroBatch:
        inputs = self.inputs.like(batch)
        copy_into(inputs, batch)  # what the warm-ups run on
        held = self.pool_allocated()
        saved = [grad.clone() for grad in self.gradients]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            first = self.warmup > 0 and not self.pool_used
            if first:  # what the model makes on first use (frozen decoders on the device...) lands outside the pool
                self.run(inputs, *settings)
                self.release_cached()  # its activations, cached outside the pool, given back for the pool's use
            with torch.cuda.use_mem_pool(self.pool):
                for _ in range(self.warmup - first):
                    self.run(inputs, *settings)
            self.release_cached()  # the warm-ups' backward allocated outside the pool (autograd's own thread)
        self.pool_used = True
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for grad, before in zip(self.gradients, saved):  # the warm-ups' gradients are not the step's
            grad.copy_(before)
        del saved
        left = self.pool_allocated() - held
        if left > 0 and self.graphs:  # what the warm-ups left in the pool may lie where those graphs keep activations
            logger.info("micro-batch CUDA graphs: a warm-up left %d bytes allocated; the %d graphs recorded before "
                        "it are recorded again at their next use", left, len(self.graphs))
            self.graphs.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.id, stream=self.stream):
            outputs = self.run(inputs, *settings)
        return RecordedMicroBatch(graph, inputs, outputs)
