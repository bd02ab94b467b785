"""train.report_to: W&B (offline run files) and MLflow (a local file store) get metrics.jsonl's scalars, and a
resumed run continues the same tracker runs. The real wandb and mlflow packages; skipped where not installed."""
import json
import struct
from pathlib import Path

import pytest
import torch

from covt.config import load_config
from trainer.metrics import TRACKERS_FILE, MetricsLogger, step_scalars
from trainer.schedule import Schedule

STAGES = "[{name: understanding, steps: 2, merge_after: true}, {name: generation, steps: 2, merge_after: true}]"


def log_steps(out: Path, report_to: str, initial: int, steps: range, run_name: str = "habits") -> None:
    """Steps ``steps`` of a run through the trainer's MetricsLogger, as the loop logs them."""
    cfg = load_config(None, [f"train.output_dir={out}", f"train.report_to={report_to}", f"train.stages={STAGES}",
                             f"train.run_name={run_name}"])
    schedule = Schedule(cfg.train.stages)
    logger = MetricsLogger(cfg, out, rank=0, total=schedule.total_steps, initial=initial, samples_per_step=4)
    for done in steps:
        logger.start_clock()
        losses = {"loss": 1.0 / done, "text": 0.5 / done, "depth": 0.25 / done}
        logger.step(done, schedule.stage_at(done - 1), losses, {"lr": 1e-3 * done, "projection_lr": 1e-4}, every=1,
                    grad_norm=2.0 * done)
    logger.close()


def test_metrics_jsonl_and_tensorboard_without_trackers_installed(tmp_path):
    log_steps(tmp_path, "[tensorboard]", 0, range(1, 3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["depth"] == 0.125
    assert any((tmp_path / "tb").iterdir())
    log_steps(tmp_path / "none", "[none]", 0, range(1, 2))
    assert not (tmp_path / "none" / "tb").exists()


def test_perf_records_the_wait_for_the_loader_within_the_step(tmp_path, monkeypatch):
    import trainer.metrics

    now = [0.0]  # the logger's clock: advanced by the loader's waits and the step's own work only
    monkeypatch.setattr(trainer.metrics.time, "perf_counter", lambda: now[0])
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.report_to=[none]", f"train.stages={STAGES}"])
    schedule = Schedule(cfg.train.stages)
    logger = MetricsLogger(cfg, tmp_path, rank=0, total=schedule.total_steps, initial=0, samples_per_step=4)

    def slow_loader():  # each micro-batch takes 0.25 s to arrive: 2 rows, 5 of their 8 tokens the samples'
        while True:
            now[0] += 0.25
            yield {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}

    loader = slow_loader()
    for done, micro_batches in ((1, 2), (2, 1)):
        logger.start_clock()
        for _ in range(micro_batches):
            logger.next_batch(loader)
        now[0] += 1.0  # the step's own work
        logger.step(done, schedule.stage_at(done - 1), {"loss": 1.0, "text": 1.0}, {"lr": 1e-3}, every=1)
    logger.close()
    perf = [json.loads(line) for line in (tmp_path / "perf-rank0.jsonl").read_text().splitlines()]
    assert [(p["step"], p["seconds"], p["data_seconds"]) for p in perf] == [(1, 1.5, 0.5), (2, 1.25, 0.25)]
    assert [(p["tokens"], p["padding_fraction"]) for p in perf] == [(10, 0.375), (5, 0.375)]
    scalars = step_scalars({"loss": 1.0}, {"lr": 1e-3}, 1.0, perf[0], 4, 0)
    assert scalars["perf/tokens_per_second"] == pytest.approx(10 / 1.5)
    assert scalars["perf/padding_fraction"] == 0.375 and scalars["perf/samples_per_second"] == pytest.approx(4 / 1.5)


def test_perf_records_the_graphs_each_step_recorded_under_cuda_graphs(tmp_path):
    """train.cuda_graphs: each perf record says how many micro-batch graphs its step recorded (the loop hands the
    run's running total over), so a step slowed by recording is told apart from a replayed one; without graphs the
    field is absent."""
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.report_to=[none]", f"train.stages={STAGES}"])
    schedule = Schedule(cfg.train.stages)
    logger = MetricsLogger(cfg, tmp_path, rank=0, total=schedule.total_steps, initial=0, samples_per_step=4)
    logger.step(1, schedule.stage_at(0), {"loss": 1.0, "text": 1.0}, {"lr": 1e-3}, every=1)  # before any graph
    for done, total in ((2, 3), (3, 3), (4, 5)):
        logger.graphs_recorded(total)
        logger.step(done, schedule.stage_at(done - 1), {"loss": 1.0, "text": 1.0}, {"lr": 1e-3}, every=1)
    logger.close()
    perf = [json.loads(line) for line in (tmp_path / "perf-rank0.jsonl").read_text().splitlines()]
    assert "graphs_recorded" not in perf[0]
    assert [p["graphs_recorded"] for p in perf[1:]] == [3, 0, 2]
    assert step_scalars({"loss": 1.0}, {"lr": 1e-3}, 1.0, perf[3], 4, 0)["perf/graphs_recorded"] == 2


# ----------------------------------------------------------------------------- W&B
def wandb_records(run_file: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 32 KiB blocks of
    crc32(4) length(2) type(1) chunks, after W&B's 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            yield message
            record = b""
        elif kind == 0:
            break


def wandb_history(out: Path) -> tuple[set[str], dict[int, dict]]:
    """(the run ids, {step: {scalar: value}}) of every offline run file under out/wandb."""
    ids, history = set(), {}
    for run_file in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            if record.HasField("run"):
                ids.add(record.run.run_id)
            if record.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[items["_step"]] = items
    return ids, history


def test_wandb_offline_run_holds_the_scalars_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install '.[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_steps(tmp_path, "[tensorboard,wandb]", 0, range(1, 3))
    identity = json.loads((tmp_path / TRACKERS_FILE).read_text())
    log_steps(tmp_path, "[tensorboard,wandb]", 2, range(3, 5))  # resumed from the step-2 checkpoint

    ids, history = wandb_history(tmp_path)
    assert ids == {identity["wandb_id"]}  # both sessions write to one W&B run
    assert sorted(history) == [1, 2, 3, 4]
    step3 = history[3]
    assert step3["loss/depth"] == pytest.approx(0.25 / 3) and step3["lr/lr"] == pytest.approx(3e-3)
    assert step3["lr/projection_lr"] == pytest.approx(1e-4) and step3["grad_norm"] == pytest.approx(6.0)
    assert step3["perf/step_seconds"] >= 0 and "perf/samples_per_second" in step3
    metrics_jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in metrics_jsonl:
        assert history[row["step"]]["loss/text"] == pytest.approx(row["text"])
    assert json.loads((tmp_path / TRACKERS_FILE).read_text())["wandb_id"] == identity["wandb_id"]

    log_steps(tmp_path / "fresh", "[wandb]", 0, range(1, 2))  # step 0: a new run
    assert json.loads((tmp_path / "fresh" / TRACKERS_FILE).read_text())["wandb_id"] != identity["wandb_id"]


# ----------------------------------------------------------------------------- MLflow
def test_mlflow_file_store_gets_the_scalars_the_config_and_one_run_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install '.[mlflow]')")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "habits-test")
    out = tmp_path / "run"
    log_steps(out, "[mlflow]", 0, range(1, 3))
    log_steps(out, "[mlflow]", 2, range(3, 5))

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("habits-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "habits"
    run_id = runs[0].info.run_id
    assert json.loads((out / TRACKERS_FILE).read_text())["mlflow_run_id"] == run_id
    depth = {m.step: m.value for m in client.get_metric_history(run_id, "loss/depth")}
    assert depth == pytest.approx({s: 0.25 / s for s in (1, 2, 3, 4)})
    assert {m.step for m in client.get_metric_history(run_id, "perf/samples_per_second")} == {1, 2, 3, 4}
    assert runs[0].data.params["train.stages"].startswith("[{")
    assert runs[0].data.params["train.run_name"] == "habits"
