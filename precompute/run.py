"""The precompute driver: records -> square views -> anchors -> shards.

Flow: read the LLaVA records; open the cache (``shards.writer.CacheWriter``);
load the selected anchors; rank 0 exports their frozen decoders and declares
them, every rank then declares too (idempotent, it checks agreement); each rank
walks the shards it owns (``shards_for_rank``), writes the sample tar if it is
not committed yet, decodes the images in a small thread pool, builds each
anchor's view (``precompute.views``: by default the square view straight from the
original, ``covt.images.square_view``; ``reference`` the reference's inputs,
``precompute/views.py``) and runs the anchors in batches of ``precompute.batch_size``; each anchor's
targets for a shard are committed (in a background thread, overlapping the next
shard's compute) as soon as the shard is done. After a barrier
rank 0 writes the manifest. A crash loses at most the shard in progress; a
rerun skips every committed part.

Records with several images: anchors see image 0 (the VLM's view of the others
is not an anchor target in CoVT).

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) a process group is
initialised (NCCL on CUDA, gloo on CPU) only for barriers; ranks own disjoint
shards and never exchange data.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from covt.compute import Compute, compute_cleanup, compute_init, tf32_matmuls, use_tf32
from covt.config import Config, PrecomputeConfig
from covt.fs import naming_disk_full
from covt.images import open_rgb
from precompute import calibrate
from precompute.anchors import load_anchor
from precompute.anchors.base import AnchorModel
from precompute.lengths import length_check
from precompute.records import load_records, split_validation
from precompute.views import ViewKey, describe, make_view, view_key
from shards.layout import validation_cache_dir
from shards.samples import Record
from shards.storage import open_writer, writer_lock
from shards.writer import CacheWriter

log = logging.getLogger(__name__)


# ranks only wait for each other (decoders exported, all shards done); a slow rank may take hours
# on big datasets, so the barrier timeout must not be the default minutes
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass
class AnchorTiming:
    """Synchronised compute time per anchor, for images/s in the summary and the bench."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    images: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def images_per_second(self, anchor: str) -> float:
        s = self.seconds.get(anchor, 0.0)
        return self.images.get(anchor, 0) / s if s > 0 else float("nan")

    def of(self, anchor: str) -> dict:
        """The anchor's line of the summary: seconds, images, images/s."""
        return {"seconds": self.seconds.get(anchor, 0.0), "images": self.images.get(anchor, 0),
                "images_per_s": self.images_per_second(anchor)}


def time_compute(anchor: AnchorModel, views: torch.Tensor, timing: AnchorTiming) -> dict[str, np.ndarray]:
    """``anchor``'s targets for ``views``, its time added to ``timing``: the current stream's, so an anchor timed
    beside SAM (:class:`AnchorsBesideSam`) waits for its own work only."""
    cuda = views.device.type == "cuda"
    sync = torch.cuda.current_stream(views.device).synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = anchor.compute(views)
    sync()
    timing.seconds[anchor.name] += time.perf_counter() - start
    timing.images[anchor.name] += views.shape[0]
    return out


class AnchorsBesideSam:
    """``precompute.overlap_anchors``: each batch's other anchors in a second thread, on a CUDA stream of their own,
    while SAM computes in this one, so their kernels fill what SAM's mask generation leaves of the GPU. Each anchor's
    work and its copies to the host stay on its stream; the targets are the same as one after another."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="anchors-beside-sam")

    def compute(self, models: dict[str, AnchorModel], batches: dict[str, torch.Tensor],
                timing: AnchorTiming) -> dict[str, dict[str, np.ndarray]]:
        others = [n for n in models if n != "sam"]
        if self.stream is not None:  # the views were copied on this thread's stream
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        pending = self.pool.submit(self._compute_on_stream, models, others, batches, timing)
        out = {"sam": time_compute(models["sam"], batches["sam"], timing)}
        out.update(pending.result())
        return {n: out[n] for n in models}

    def _compute_on_stream(self, models, names, batches, timing) -> dict[str, dict[str, np.ndarray]]:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            return {n: time_compute(models[n], batches[n], timing) for n in names}

    def close(self) -> None:
        self.pool.shutdown()


def decode_views(record: Record, keys: list[ViewKey]) -> dict[ViewKey, np.ndarray]:
    """The record's first image as every view the anchors want."""
    path = record.images[0]
    try:
        image = open_rgb(path.read_bytes())
    except Exception as e:  # records were checked when read; this is a file changed since
        raise RuntimeError(f"record id={record.id!r}: cannot decode {path}: {type(e).__name__}: {e}") from e
    return {key: make_view(image, key) for key in keys}


class ViewLoader:
    """The views of a shard's records, decoded by ``workers`` threads, one batch ahead."""

    def __init__(self, keys: list[ViewKey], workers: int):
        self.keys = keys
        self.pool: Executor | None = ThreadPoolExecutor(workers) if workers > 0 else None

    def _submit(self, recs: list[Record]) -> list[Future] | list[dict]:
        if self.pool is None:
            return [decode_views(r, self.keys) for r in recs]
        return [self.pool.submit(decode_views, r, self.keys) for r in recs]

    def batches(self, records: list[Record], batch_size: int):
        groups = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
        pending = self._submit(groups[0]) if groups else []
        for i in range(len(groups)):
            current = [f.result() if isinstance(f, Future) else f for f in pending]
            pending = self._submit(groups[i + 1]) if i + 1 < len(groups) else []
            yield {k: np.stack([v[k] for v in current]) for k in self.keys}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def precompute(cfg: Config, anchors: list[str] | None = None) -> dict:
    """Run (or resume) the precompute; returns a summary. ``anchors`` defaults to ``cfg.anchors``."""
    names = list(dict.fromkeys(anchors or cfg.anchors))
    started = time.perf_counter()
    compute = compute_init(cfg.precompute.device, "precompute.device", BARRIER_TIMEOUT)
    use_tf32(cfg.precompute.tf32)
    try:
        # one precompute per cache (and its validation/; at a URL too: an object created only if absent);
        # every rank enters
        with writer_lock(cfg.cache.dir):
            records, bad = load_records(cfg.data, length_check(cfg))
            records, held_out, held_out_bad = split_validation(cfg.data, records, bad)
            subset = dataclasses.asdict(cfg.data.subset) if cfg.data.subset.size is not None else None
            summary = _run(cfg, names, compute, started, cfg.cache.dir, records, bad, subset)
            if cfg.data.validation is not None:  # data.validation: the held-out samples, a cache of their own
                _run(cfg, names, compute, time.perf_counter(), validation_cache_dir(cfg.cache.dir), held_out,
                     held_out_bad)
            return summary
    finally:
        compute_cleanup(compute)


def _run(cfg: Config, names: list[str], compute: Compute, started: float, cache_dir: str | Path,
         records: list[Record], bad: list, subset: dict | None = None) -> dict:
    pre, device = cfg.precompute, compute.device
    # a URL: written in a local staging folder, each part uploaded as it commits (shards.storage)
    writer = open_writer(cache_dir, records, cfg.cache.shard_size, bad, cfg.cache.codec, cfg.cache.codecs,
                         subset=subset, local_dir=cfg.cache.local_dir or None)
    models: dict[str, AnchorModel] = {name: load_anchor(name, pre, device) for name in names}

    keys = {name: view_key(name, model.input_size, pre.views) for name, model in models.items()}
    loader = ViewLoader(sorted(set(keys.values())), pre.num_workers)
    timing = AnchorTiming()
    if compute.rank == 0:  # other ranks read rank 0's declarations from the cache when they write targets
        declare_anchors(writer, models, keys, pre.views, cfg.cache.codec_max_error, loader, pre.batch_size, device,
                        timing)
    compute.barrier()
    writer.sync()  # a URL's staging folder fetches rank 0's declarations from the store
    owned = writer.shards_for_rank(compute.rank, compute.world)
    todo = {s: [n for n in names if not writer.shard_done(s, n)] for s in owned}
    samples_todo = [s for s in owned if not writer.shard_done(s)]
    work = [s for s in owned if todo[s] or s in samples_todo]
    images_todo = sum(len(writer.shard_records(s)) for s in work if todo[s])
    bar = progress_bar(images_todo, compute)
    try:
        compute_shards(writer, work, todo, samples_todo, models, keys, loader, pre, device, timing, bar)
    finally:
        bar.close()
        loader.close()

    compute.barrier()
    manifest = writer.finalize() if compute.rank == 0 else None
    summary = {
        "rank": compute.rank, "world": compute.world, "device": str(device),
        "cache": str(cache_dir), "samples": len(records), "skipped_bad_records": len(bad),
        "shards_owned": len(owned), "shards_computed": sum(1 for s in owned if todo[s]),
        "images_computed": images_todo,
        "seconds": time.perf_counter() - started,
        "anchors": {n: timing.of(n) for n in names},
        "manifest": manifest,
    }
    print(summary_line(summary), flush=True)
    return summary


def compute_shards(writer: CacheWriter, work: list[int], todo: dict[int, list[str]], samples_todo: list[int],
                   models: dict[str, AnchorModel], keys: dict, loader: ViewLoader, pre: PrecomputeConfig,
                   device: torch.device, timing: AnchorTiming, bar: tqdm) -> None:
    """Each shard of ``work``: its sample tar if not committed yet, then the anchors of ``todo[shard]``. Targets
    are encoded, compressed and committed in the background while the next shard computes, one thread per anchor
    (the writer is thread-safe per shard and anchor, and its heavy parts release the GIL); at most one shard waits
    there, so memory stays at two shards of targets."""
    committer = ThreadPoolExecutor(max(1, len(models)))
    committing: list[Future] = []
    beside = AnchorsBesideSam(device) if pre.overlap_anchors else None
    try:
        for shard in work:
            if shard in samples_todo:
                writer.write_samples(shard)
            if not todo[shard]:
                continue
            outputs = compute_shard({n: models[n] for n in todo[shard]}, keys, writer.shard_records(shard), loader,
                                    pre.batch_size, device, timing, bar, beside)
            for f in committing:
                f.result()
            committing = [committer.submit(commit_targets, writer, shard, name, parts)
                          for name, parts in outputs.items()]
        for f in committing:
            f.result()
    finally:
        committer.shutdown()
        if beside is not None:
            beside.close()


def compute_shard(models: dict[str, AnchorModel], keys: dict, recs: list[Record], loader: ViewLoader,
                  batch_size: int, device: torch.device, timing: AnchorTiming, bar: tqdm | None = None,
                  beside: AnchorsBesideSam | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every model's targets for ``recs``, batch by batch (a list of per-batch outputs per anchor); with ``beside``,
    the other anchors of each batch beside SAM."""
    outputs: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in models}
    overlap = beside is not None and "sam" in models and len(models) > 1
    for views in loader.batches(recs, batch_size):
        batches = {n: torch.from_numpy(views[keys[n]]).to(device, non_blocking=True) for n in models}
        done = beside.compute(models, batches, timing) if overlap else \
            {n: time_compute(m, batches[n], timing) for n, m in models.items()}
        for name, targets in done.items():
            outputs[name].append(targets)
        if bar is not None:
            bar.update(len(next(iter(views.values()))))
            bar.set_postfix({n: f"{timing.images_per_second(n):.1f}/s" for n in models}, refresh=False)
    return outputs


def declare_anchors(writer: CacheWriter, models: dict[str, AnchorModel], keys: dict, views: str,
                    bound: float | None, loader: ViewLoader, batch_size: int, device: torch.device,
                    timing: AnchorTiming) -> None:
    """Export decoders and declare each anchor (rank 0). Anchors with codecs measured on the data are first
    computed on shard 0 and calibrated (precompute/calibrate.py); those targets are committed right away."""
    fresh = {n: m for n, m in models.items() if calibrate.needs_calibration(writer, n, bound)}
    first = compute_shard(fresh, keys, writer.shard_records(0), loader, batch_size, device, timing) if fresh else {}
    for name, model in models.items():
        with naming_disk_full(writer.decoders_dir):  # the rerun exports them again
            decoders = model.export_decoders(writer.decoders_dir)
        fingerprint = model.fingerprint()
        if views != "square":  # recorded only when not the default, so existing caches stay valid
            fingerprint["views"] = describe(keys[name])
        if device.type == "cuda" and tf32_matmuls():  # likewise: fp32 matrix products ran in TF32 (precompute.tf32)
            fingerprint["fp32_matmuls"] = "tf32"
        if name in first:
            codecs, calibration = calibrate.calibrate(writer, name, joined(first[name]), bound)
        else:
            codecs, calibration = calibrate.declared_choice(writer, name)
        writer.declare_anchor(name, model.dims(), fingerprint, decoders, codecs=codecs, calibration=calibration)
        if name in first:
            commit_targets(writer, 0, name, first.pop(name))


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def progress_bar(images: int, compute: Compute) -> tqdm:
    """Images computed, shown by rank 0."""
    desc = f"precompute rank {compute.rank}" if compute.world > 1 else "precompute"
    return tqdm(total=images, unit="img", desc=desc, disable=compute.rank != 0, dynamic_ncols=True)


def commit_targets(writer: CacheWriter, shard: int, anchor: str, parts: list[dict[str, np.ndarray]]) -> None:
    writer.write_targets(shard, anchor, joined(parts))


def summary_line(s: dict) -> str:
    rates = ", ".join(
        f"{n} {a['images_per_s']:.1f} img/s" if a["images"] else f"{n} up to date" for n, a in s["anchors"].items()
    )
    who = f"rank {s['rank']}/{s['world']}: " if s["world"] > 1 else ""
    return (f"precompute {who}{s['samples']} samples ({s['skipped_bad_records']} bad records skipped), "
            f"{s['images_computed']} images computed on {s['device']} in {s['seconds']:.1f}s; {rates} -> {s['cache']}")
