"""What a training run reports, and where: the console, metrics.jsonl, perf-rank{R}.jsonl, the trackers.

:class:`MetricsLogger` is the loop's one reporter. Rank 0 keeps the progress bar, ``metrics.jsonl``
(one line per optimizer step: stage, losses per anchor, lr per group, grad norm, validation) and the
trackers named in ``train.report_to`` (:class:`TensorBoardTracker`, :class:`WandbTracker`,
:class:`MlflowTracker`), which all receive the same scalars: metrics.jsonl's plus the step time,
samples and tokens per second, the padding's share of the tokens, time waiting for data, peak GPU memory and,
under train.cuda_graphs, the micro-batch graphs the step recorded, of ``perf-rank0.jsonl``. Every rank writes its
``perf-rank{R}.jsonl``, kept apart from the losses so that metrics.jsonl of a resumed run equals an
uninterrupted one's: resuming at step ``initial`` drops the lines and TensorBoard points a cut-short
run wrote after it.

The run's name and its W&B / MLflow run ids live in ``output_dir/trackers.json`` (:func:`run_identity`),
so a run resumed from a checkpoint continues the same W&B run and MLflow run; a run that starts at
step 0 starts new ones. W&B cannot rewind: points a cut-short run logged after its last checkpoint
keep their first values there (metrics.jsonl and TensorBoard hold the resumed ones).
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from pathlib import Path

import torch
from tqdm import tqdm

from covt.config import Config, flatten
from covt.fs import atomic_write

log = logging.getLogger("trainer")
TRACKERS_FILE = "trackers.json"
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # train.report_to's choices, besides "none"


class MetricsLogger:
    """The training loop's reporter (see the module docstring)."""

    def __init__(self, cfg: Config, out: Path, rank: int, total: int, initial: int, samples_per_step: int):
        self.active = rank == 0
        self.rank = rank
        self.damaged: set[str] = set()  # distinct damaged samples (a sample is skipped again each epoch)
        self.samples_per_step = samples_per_step
        out.mkdir(parents=True, exist_ok=True)
        self.perf = open(out / f"perf-rank{rank}.jsonl", "a")
        self.last_time = time.perf_counter()
        self.data_seconds = 0.0  # of the step being timed: waiting for the loader's micro-batches
        self.tokens = self.padded_tokens = 0  # of the step being timed: its micro-batches' tokens, without and with
        self.recordings: int | None = None  # train.cuda_graphs: the run's micro-batch graphs recorded so far
        self.recordings_logged = 0  # ... as of the last perf record
        self.trackers: list = []
        if not self.active:
            return
        truncate_metrics(out / "metrics.jsonl", initial)
        self.metrics = open(out / "metrics.jsonl", "a")
        self.trackers = open_trackers(cfg, out, initial)
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def start_clock(self) -> None:
        """The optimizer step is timed from here (data, forward, backward, optimizer; not checkpoints)."""
        self.last_time = time.perf_counter()
        self.data_seconds = 0.0
        self.tokens = self.padded_tokens = 0

    def next_batch(self, loader):
        """``next(loader)``, its wait counted in the step's ``data_seconds`` (a step that mostly waits is
        bound by its loader: more ``train.num_workers``), its tokens in the step's ``tokens`` (the samples' own;
        ``padding_fraction``: the share of the micro-batches' tokens that pad, which ``train.pad_to_multiple_of``
        adds to)."""
        started = time.perf_counter()
        batch = next(loader)
        self.data_seconds += time.perf_counter() - started
        if "attention_mask" in batch:  # on the host: no wait for the GPU
            self.tokens += int(batch["attention_mask"].sum())
            self.padded_tokens += batch["attention_mask"].numel()
        return batch

    def graphs_recorded(self, total: int) -> None:
        """Under train.cuda_graphs: the micro-batch graphs the run has recorded so far. The step's perf record gets
        ``graphs_recorded``, those recorded in that step: a step that records runs its micro-batch's warm-ups too,
        several times slower than a replay, so the steady rate is that of the steps that record none."""
        self.recordings = total

    def info(self, message: str) -> None:
        if self.active:
            log.info(message)

    def warning(self, message: str) -> None:
        """Every rank: a fault seen by one rank only (a damaged sample) must not go unsaid."""
        log.warning(f"rank {self.rank}: {message}" if self.rank else message)

    def damaged_samples(self, problems: list[str], step: int) -> None:
        for problem in sorted(set(problems) - self.damaged):
            self.damaged.add(problem)
            self.warning(f"step {step + 1}: skipped damaged sample ({len(self.damaged)} so far; "
                         f"train.on_damaged_sample=skip): {problem}")

    def step(self, done: int, at, losses: dict[str, float], lrs: dict[str, float], every: int,
             skipped: bool = False, grad_norm: float = float("nan"),
             validation: dict[str, float] | None = None) -> None:
        perf = self.write_perf(done)
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
            record["damaged_samples_skipped"] = len(self.damaged)
        if validation is not None:
            record["validation"] = validation
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        scalars = {f"validation/{name}": value for name, value in (validation or {}).items()}  # every point
        if every and done % every == 0:
            scalars.update(step_scalars(losses, lrs, grad_norm, perf, self.samples_per_step, len(self.damaged)))
        for tracker in self.trackers if scalars else []:
            tracker.log(scalars, done)

    def write_perf(self, done: int) -> dict:
        now = time.perf_counter()
        perf = {"step": done, "seconds": round(now - self.last_time, 4), "data_seconds": round(self.data_seconds, 4)}
        if self.padded_tokens:
            perf.update(tokens=self.tokens, padding_fraction=round(1 - self.tokens / self.padded_tokens, 4))
        if self.recordings is not None:
            perf["graphs_recorded"] = self.recordings - self.recordings_logged
            self.recordings_logged = self.recordings
        self.last_time = now
        if torch.cuda.is_available():
            perf["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.perf.write(json.dumps(perf) + "\n")
        self.perf.flush()
        return perf

    def close(self) -> None:
        self.perf.close()
        if self.active:
            self.bar.close()
            self.metrics.close()
            for tracker in self.trackers:
                tracker.close()


def step_scalars(losses: dict[str, float], lrs: dict[str, float], grad_norm: float, perf: dict,
                 samples_per_step: int, damaged: int) -> dict[str, float]:
    """The trackers' scalars of one optimizer step, named as in TensorBoard (loss/text, lr/projection_lr, ...)."""
    scalars = {**{f"loss/{k}": v for k, v in losses.items()}, **{f"lr/{k}": v for k, v in lrs.items()},
               "grad_norm": grad_norm, "perf/step_seconds": perf["seconds"], "perf/data_seconds": perf["data_seconds"],
               "perf/samples_per_second": samples_per_step / perf["seconds"] if perf["seconds"] > 0 else 0.0}
    if "tokens" in perf:
        scalars["perf/tokens_per_second"] = perf["tokens"] / perf["seconds"] if perf["seconds"] > 0 else 0.0
        scalars["perf/padding_fraction"] = perf["padding_fraction"]
    if "graphs_recorded" in perf:
        scalars["perf/graphs_recorded"] = perf["graphs_recorded"]
    if "peak_gpu_memory_gib" in perf:
        scalars["perf/peak_gpu_memory_gib"] = perf["peak_gpu_memory_gib"]
    if damaged:
        scalars["damaged_samples_skipped"] = damaged
    return scalars


# ----------------------------------------------------------------------------- trackers
def open_trackers(cfg: Config, out: Path, initial: int) -> list:
    """The trackers of train.report_to, each resuming its run when ``initial`` > 0."""
    names = [n for n in cfg.train.report_to if n != "none"]
    identity = run_identity(cfg, out, initial)
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out / "tb", initial))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg, out, identity))
        elif name == "mlflow":
            trackers.append(MlflowTracker(cfg, identity))
    atomic_write(out / TRACKERS_FILE, (json.dumps(identity, indent=2) + "\n").encode())
    return trackers


def run_identity(cfg: Config, out: Path, initial: int) -> dict:
    """{"run_name", "wandb_id", "mlflow_run_id"}: kept from trackers.json when resuming, else new."""
    path = out / TRACKERS_FILE
    if initial > 0 and path.is_file():
        return json.loads(path.read_text())
    return {"run_name": cfg.train.run_name or Path(cfg.train.output_dir).name, "wandb_id": secrets.token_hex(4),
            "mlflow_run_id": None}


class TensorBoardTracker:
    """output_dir/tb; resuming at step ``initial`` hides the points a cut-short run wrote after it."""

    def __init__(self, tb_dir: Path, initial: int):
        from torch.utils.tensorboard import SummaryWriter

        wait_for_a_later_event_file_name(tb_dir)
        self.writer = SummaryWriter(str(tb_dir), purge_step=initial + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases (``pip install .[wandb]``): project from $WANDB_PROJECT (default covt), run files under
    output_dir/wandb; WANDB_MODE=offline writes them for a later ``wandb sync``."""

    def __init__(self, cfg: Config, out: Path, identity: dict):
        wandb = import_tracker("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "covt"), name=identity["run_name"],
                              id=identity["wandb_id"], resume="allow", dir=str(out), config=cfg.to_dict())

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLflow (``pip install .[mlflow]``): the server or store of $MLFLOW_TRACKING_URI, the experiment
    $MLFLOW_EXPERIMENT_NAME (default covt); the resolved config as the run's parameters and config.json."""

    def __init__(self, cfg: Config, identity: dict):
        import_tracker("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient()
            run_id = identity["mlflow_run_id"]
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "covt")
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run_id = self.client.create_run(experiment_id, run_name=identity["run_name"]).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                    self.client.log_batch(run_id, params=params[i:i + 100])
                self.client.log_dict(run_id, cfg.to_dict(), "config.json")
        except Exception as e:  # noqa: BLE001 -- MLflow's store errors come in many types; say what to set
            raise RuntimeError(f"train.report_to mlflow: {e}; set MLFLOW_TRACKING_URI (an MLflow server URL, or "
                               "file:PATH with MLFLOW_ALLOW_FILE_STORE=true)") from e
        identity["mlflow_run_id"] = self.run_id = run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[^\w\-. /]", "_", k), float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def import_tracker(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"train.report_to {module}: the package is not installed; "
                           f"pip install '.[{extra}]' (or drop {module} from train.report_to)") from e


# ----------------------------------------------------------------------------- files
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
