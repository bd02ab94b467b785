"""Several GPUs: multi-rank precompute equals single-rank, and the 7B recipe under DeepSpeed ZeRO-3.

    python bench/bench_multi_gpu.py --gpus 2 --work /tmp/mgpu     # a machine with 2+ GPUs
    python bench/bench_multi_gpu.py --gpus 2 --tiny --work /tmp/m  # CPU smoke run (gloo), tiny model
    python bench/bench_multi_gpu.py --throughput 1xnonex4xnockpt,4xzero2x2xnockpt   # trainer samples/s

1. ``python -m precompute`` on the embedded default, once with one rank and once under
   ``torchrun --nproc-per-node N``: the N-rank cache must verify and hold the same targets.
2. ``torchrun --nproc-per-node N -m trainer`` with configs/deepspeed/zero3.json on a
   Qwen2.5-VL-7B-sized model with random weights (saved once as a Hugging Face folder), a
   cache of synthetic targets of the real cached shapes (sam+depth+dino), a schedule with a
   stage transition, checkpoints every step, a stop after step 3, a resume, the LoRA merge
   and the final export. Reports seconds per step and peak memory of every GPU
   (output_dir/perf-rank{R}.jsonl) and whether the resumed run went on from the checkpoint.
3. ``--throughput``: the trainer's steady samples/s at the recipe's global batch of 8 for
   given GPU counts, ZeRO stages and micro-batch sizes (7B-sized, ~300 text tokens per
   sample), and the projected hours of the recipe's 16000 optimizer steps. With
   ``--four-stages`` each run is the whole recipe in miniature (``--steps`` per stage, stage 4
   twice as long with its second half text-only, both merges and the export) and the figures
   are per stage, the projection the recipe's own schedule (configs/covt_7b_sam_depth_dino.yaml)
   times each stage's measured seconds per step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# keep NVLink multicast off (shared hosts)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
           PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def run(cmd: list[str], what: str) -> float:
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    print(f"  {what}: {seconds:.1f} s", flush=True)
    return seconds


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def precompute_ranks_agree(n: int, work: Path, device: str) -> dict:
    import numpy as np

    from shards.reader import Cache

    base = ["--config", "configs/tiny.yaml", f"precompute.device={device}",
            f"precompute.checkpoints.sam.path={work}/ckpt/sam.pth",
            f"precompute.checkpoints.depth.path={work}/ckpt/depth.pth",
            f"precompute.checkpoints.dino.path={work}/ckpt/dino.pth",
            f"precompute.checkpoints.siglip.path={work}/ckpt/siglip",
            f"precompute.checkpoints.metaclip.path={work}/ckpt/metaclip"]
    single, multi = work / "cache-1rank", work / f"cache-{n}ranks"
    t1 = run([sys.executable, "-m", "precompute", *base, f"cache.dir={single}"], "precompute, 1 rank")
    tn = run([*torchrun(n), "-m", "precompute", *base, f"cache.dir={multi}"], f"precompute, {n} ranks")
    run([sys.executable, "-m", "shards", "inspect", str(multi), "--verify"], f"inspect --verify of the {n}-rank cache")
    a, b = Cache(single), Cache(multi)
    assert a.num_samples == b.num_samples, (a.num_samples, b.num_samples)
    worst: dict[str, float] = {}
    for i in range(a.num_samples):
        ta, tb = a.sample(i)["targets"], b.sample(i)["targets"]
        for anchor in ta:
            for name in ta[anchor]:
                x, y = ta[anchor][name].double().numpy(), tb[anchor][name].double().numpy()
                key = f"{anchor}/{name}"
                worst[key] = max(worst.get(key, 0.0), float(np.abs(x - y).max()) if x.size else 0.0)
    num_shards = len(json.loads((multi / "manifest.json").read_text())["shards"])
    owners = {r: [s for s in range(num_shards) if s % n == r] for r in range(n)}
    return {"samples": a.num_samples, "seconds_1rank": t1, f"seconds_{n}ranks": tn,
            "max_abs_difference": worst, "shards_by_rank": owners}


def build_base(work: Path, tiny: bool) -> Path:
    """A Qwen2.5-VL folder: 7B-sized random bf16 weights (or the tiny model), with a local processor."""
    path = work / ("base-tiny" if tiny else "base-7b")
    if (path / "config.json").is_file():
        return path
    import torch

    from trainer.tiny_model import build_processor, build_tiny_base_model, build_tokenizer

    if tiny:
        return build_tiny_base_model(path)
    from bench.bench_train_step import build_vlm, qwen2_5_vl_7b_config

    processor = build_processor(build_tokenizer(), 448)
    vlm = build_vlm(qwen2_5_vl_7b_config(processor.tokenizer), torch.device("cuda"), torch.bfloat16, False)
    vlm.save_pretrained(path)
    processor.save_pretrained(path)
    del vlm
    torch.cuda.empty_cache()
    return path


def build_cache(work: Path, tiny: bool, data=None, name: str | None = None) -> Path:
    from bench.bench_train_step import REAL_DIMS, REAL_SAM, TINY_DIMS, TINY_SAM, write_sam_decoder
    from covt.config import DataConfig
    from shards.reader import Cache
    from tests.synthetic import write_synthetic_cache

    cache = work / (name or ("cache-synthetic-tiny" if tiny else "cache-synthetic-real"))
    if not (cache / "manifest.json").is_file():
        data = data or DataConfig(path=str(REPO / "data/sample/conversations.json"),
                                  image_folder=str(REPO / "data/sample/images"))
        write_synthetic_cache(cache, data, ["sam", "depth", "dino"], dims=TINY_DIMS if tiny else REAL_DIMS,
                              shard_size=4)
        write_sam_decoder(Cache(cache).decoders_dir, TINY_SAM if tiny else REAL_SAM)
    return cache


def zero3_recipe(n: int, work: Path, tiny: bool) -> dict:
    base, cache = build_base(work, tiny), build_cache(work, tiny)
    out = work / "train-zero3"
    stages = ("[{name: understanding, steps: 3}, "
              "{name: generation, steps: 3, merge_after: true}]")
    args = ["--config", "configs/tiny.yaml", f"model.path={base}", f"cache.dir={cache}", f"train.output_dir={out}",
            "anchors=[sam,depth,dino]", f"model.image_size={112 if tiny else 448}", f"train.stages={stages}",
            "train.deepspeed=configs/deepspeed/zero3.json", "train.save_every=1", "train.batch_size=1",
            "train.max_length=2048"]
    if tiny:
        args += ["train.device=cpu", "train.bf16=false", "train.gradient_checkpointing=false"]
    else:
        args += ["train.bf16=true", "train.gradient_checkpointing=true"]
    first = run([*torchrun(n), "-m", "trainer", *args, "--stop-after", "3"], f"ZeRO-3 x{n}: steps 1-3, then stop")
    second = run([*torchrun(n), "-m", "trainer", *args], f"ZeRO-3 x{n}: resume, steps 4-6, merge, export")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = {r: [json.loads(line) for line in (out / f"perf-rank{r}.jsonl").read_text().splitlines()] for r in range(n)}
    final = out / "final"
    return {
        "steps": [(m["step"], m["stage"], round(m["loss"], 4)) for m in metrics],
        "resumed_at_step_4": [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6],
        "seconds_per_step_by_rank": {r: [p["seconds"] for p in rows] for r, rows in perf.items()},
        # the first two steps of each launch warm up (allocator, kernels, ZeRO-3 tracing the module
        # order for its parameter prefetch): the steady state is the median of the others
        "steady_seconds_per_step": statistics.median(
            p["seconds"] for p in perf[0] if p["step"] not in (1, 2, 4, 5)),
        "peak_gpu_memory_gib_by_rank": {r: max((p.get("peak_gpu_memory_gib", 0) for p in rows), default=0)
                                        for r, rows in perf.items()},
        "launch_seconds": [round(first, 1), round(second, 1)],
        "final_has_heads": (final / "covt_heads.safetensors").is_file(),
        "merged": any(out.glob("lora_*_merged")),
    }


def long_conversations(work: Path, text_tokens: int = 300) -> Any:
    """data/sample with each first answer lengthened to ~``text_tokens`` tokens (bench_train_step.samples)."""
    from bench.bench_train_step import samples
    from covt.config import DataConfig
    from trainer.tiny_model import build_processor, build_tokenizer

    path = work / "long_conversations.json"
    if not path.is_file():
        tokenizer = build_processor(build_tokenizer(), 448).tokenizer
        records = json.loads((REPO / "data/sample/conversations.json").read_text())
        long = samples(len(records), {}, text_tokens, tokenizer)
        rows = [{**r, "conversations": s["conversations"]} for r, s in zip(records, long, strict=True)]
        path.write_text(json.dumps(rows))
    return DataConfig(path=str(path), image_folder=str(REPO / "data/sample/images"))


def throughput_args(base: Path, cache: Path, out: Path, stages: str, batch_size: int, grad_accum: int,
                    checkpointing: bool, zero: str | None, tiny: bool) -> list[str]:
    """The trainer's arguments of a throughput run (sam+depth+dino, the real or tiny model's view)."""
    args = ["--config", "configs/tiny.yaml", f"model.path={base}", f"cache.dir={cache}", f"train.output_dir={out}",
            "anchors=[sam,depth,dino]", f"model.image_size={112 if tiny else 448}", f"train.stages={stages}",
            f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.max_length=2048",
            f"train.gradient_checkpointing={str(checkpointing).lower()}", "train.num_workers=4", "train.save_every=0"]
    args += ["train.device=cpu", "train.bf16=false"] if tiny else ["train.bf16=true"]
    return args + ([f"train.deepspeed=configs/deepspeed/{zero}.json"] if zero else [])


class Launch(NamedTuple):
    out: Path
    grad_accum: int
    seconds: float  # the whole launch
    perf: list[dict]  # rank 0's perf-rank0.jsonl
    peak_gib: float  # the highest peak GPU memory of any rank


def launch_trainer(tag: str, stages: str, n: int, zero: str | None, batch_size: int, checkpointing: bool,
                   work: Path, tiny: bool, what: str, extra: tuple[str, ...] = ()) -> Launch:
    """``python -m trainer`` under torchrun on ``n`` ranks at the recipe's global batch of 8, on the 7B-sized (or
    tiny) base and a cache of ~300-token samples with sam+depth+dino targets; its perf records."""
    base = build_base(work, tiny)
    cache = build_cache(work, tiny, data=long_conversations(work), name=f"cache-long-{'tiny' if tiny else 'real'}")
    grad_accum = 8 // (n * batch_size)
    out = work / f"{tag}-{zero or 'plain'}-x{n}-b{batch_size}-{'ckpt' if checkpointing else 'nockpt'}"
    if extra:  # a run with other settings gets a folder of its own (the trainer would resume another's)
        out = out.with_name(out.name + "-" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8])
    args = throughput_args(base, cache, out, stages, batch_size, grad_accum, checkpointing, zero, tiny)
    seconds = run([*torchrun(n), "-m", "trainer", *args, *extra],
                  f"{what}{zero or 'plain'} x{n}, micro-batch {batch_size} x accumulation {grad_accum}")
    perf = [json.loads(line) for line in (out / "perf-rank0.jsonl").read_text().splitlines()]
    peaks = [max(json.loads(line).get("peak_gpu_memory_gib", 0) for line in (out / f"perf-rank{r}.jsonl").open())
             for r in range(n)]
    return Launch(out, grad_accum, seconds, perf, max(peaks))


def throughput(n: int, zero: str | None, batch_size: int, checkpointing: bool, work: Path, steps: int,
               tiny: bool, overrides: tuple[str, ...] = ()) -> dict:
    """Samples/s of the trainer itself at the recipe's global batch of 8 on ``n`` GPUs (steady state)."""
    launch = launch_trainer("train", f"[{{name: understanding, steps: {steps + 1}, merge_after: true}}]", n, zero,
                            batch_size, checkpointing, work, tiny, "", ("--stop-after", str(steps), *overrides))
    steady = statistics.median(p["seconds"] for p in launch.perf[3:])  # the first steps warm up
    return {"gpus": n, "zero": zero or "none", "micro_batch": batch_size, "grad_accum": launch.grad_accum,
            "checkpointing": checkpointing, "seconds_per_step": steady, "samples_per_s": 8 / steady,
            "samples_per_s_per_gpu": 8 / steady / n, "peak_gpu_memory_gib": launch.peak_gib,
            "recipe_hours": 16000 * steady / 3600, "launch_seconds": round(launch.seconds, 1)}


RECIPE_CONFIG = REPO / "configs" / "covt_7b_sam_depth_dino.yaml"


def segment_of(at) -> str:
    """A part of the schedule with one cost per step: the stage, and whether its anchor losses are on."""
    return f"stage {at.stage_index + 1} {at.name}" + ("" if at.anchor_losses_on else " (text only)")


def segment_steps(stages) -> Counter:
    """segment -> optimizer steps, of a schedule (covt.config StageConfigs)."""
    from trainer.schedule import Schedule

    schedule = Schedule(stages)
    return Counter(segment_of(schedule.stage_at(step)) for step in range(schedule.total_steps))


def miniature_recipe(steps: int) -> str:
    """The recipe's four stages, ``steps`` each (stage 4 twice as long, its second half text-only)."""
    return (f"[{{name: understanding, steps: {steps}, merge_after: true}}, {{name: generation, steps: {steps}}}, "
            f"{{name: reasoning, steps: {steps}}}, {{name: efficient_reasoning, steps: {2 * steps}, "
            f"anchor_losses_off_from: {3 * steps}, merge_after: true}}]")


def stage_configs(stages_text: str) -> list:
    """The covt.config StageConfigs of a ``train.stages=`` override's value, parsed as the trainer parses it."""
    from covt.config import load_config

    return load_config(REPO / "configs/tiny.yaml", [f"train.stages={stages_text}"]).train.stages


def per_segment_seconds(stages_text: str, perf: list[dict], warm_up: int = 2,
                        replays_only: bool = False) -> dict[str, float]:
    """segment -> median seconds per optimizer step, the first ``warm_up`` steps of each segment left out (a
    new run's first step also holds the merge before it and building the run). ``replays_only``: only the steps
    that recorded no micro-batch CUDA graph (train.cuda_graphs; perf's ``graphs_recorded``), the rate once every
    layout is recorded; a segment whose steps all recorded is left out."""
    from trainer.schedule import Schedule

    schedule = Schedule(stage_configs(stages_text))
    times: dict[str, list[tuple[float, int]]] = {}
    for record in perf:
        times.setdefault(segment_of(schedule.stage_at(record["step"] - 1)), []).append(
            (record["seconds"], record.get("graphs_recorded", 0)))
    kept = {name: [t for t, recorded in values[warm_up:] if not (replays_only and recorded)]
            for name, values in times.items()}
    return {name: statistics.median(values) for name, values in kept.items() if values}


def recipe_projection(seconds: dict[str, float]) -> dict:
    """Hours of the recipe's schedule at the measured seconds per step of each segment."""
    from covt.config import load_config

    counts = segment_steps(load_config(RECIPE_CONFIG).train.stages)
    missing = sorted(set(counts) - set(seconds))
    if missing:
        raise ValueError(f"no measured steps for {missing} of the recipe")
    return {"recipe_steps": dict(counts), "recipe_hours": sum(counts[s] * seconds[s] for s in counts) / 3600}


def four_stage_throughput(n: int, zero: str | None, batch_size: int, checkpointing: bool, work: Path, steps: int,
                          tiny: bool, overrides: tuple[str, ...] = ()) -> dict:
    """The trainer's seconds per step in each stage of a miniature recipe (both merges, the export) at the
    recipe's global batch of 8 on ``n`` GPUs, and the recipe's hours at those rates."""
    if steps < 4:
        raise SystemExit("--four-stages needs --steps >= 4 (the first 2 steps of each stage warm up)")
    stages = miniature_recipe(steps)
    launch = launch_trainer("recipe", stages, n, zero, batch_size, checkpointing, work, tiny, "four stages, ",
                            overrides)
    seconds = per_segment_seconds(stages, launch.perf)
    graphs = {}
    if any("graphs_recorded" in p for p in launch.perf):  # train.cuda_graphs: also the rate once all are recorded
        replays = per_segment_seconds(stages, launch.perf, replays_only=True)
        graphs = {"graphs_recorded": sum(p["graphs_recorded"] for p in launch.perf),
                  "steps_recording": sum(bool(p["graphs_recorded"]) for p in launch.perf),
                  "steps_timed": len(launch.perf),
                  "replay_seconds_per_step": replays, "replay_samples_per_s": {k: 8 / v for k, v in replays.items()}}
        if set(replays) == set(seconds):
            graphs["replay_recipe_hours"] = recipe_projection(replays)["recipe_hours"]
    return {"gpus": n, "zero": zero or "none", "micro_batch": batch_size, "grad_accum": launch.grad_accum,
            "checkpointing": checkpointing, "seconds_per_step": seconds,
            "samples_per_s": {k: 8 / v for k, v in seconds.items()},
            # the stage-1 merge and building run 2, then a step
            "run2_first_step_seconds": launch.perf[steps]["seconds"],
            "peak_gpu_memory_gib": launch.peak_gib, "launch_seconds": round(launch.seconds, 1),
            "final_has_heads": (launch.out / "final" / "covt_heads.safetensors").is_file(),
            **recipe_projection(seconds), **graphs}


def four_stage_table(rows: list[dict]) -> str:
    """Markdown: samples/s of every stage per run, and the recipe's projected hours; under train.cuda_graphs a
    second line per run of the steps that recorded no graph (a stage where every step recorded: "-")."""
    segments = list(rows[0]["samples_per_s"])
    lines = ["| GPUs x ZeRO x micro-batch | " + " | ".join(segments) + " | recipe hours |",
             "|---|" + "---|" * (len(segments) + 1)]
    for r in rows:
        cells = [f"{r['samples_per_s'][s]:.2f}" for s in segments]
        lines.append(f"| {r['gpus']} x {r['zero']} x {r['micro_batch']} | " + " | ".join(cells) +
                     f" | {r['recipe_hours']:.2f} |")
        if "replay_samples_per_s" in r:
            cells = [f"{r['replay_samples_per_s'][s]:.2f}" if s in r["replay_samples_per_s"] else "-"
                     for s in segments]
            hours = f"{r['replay_recipe_hours']:.2f}" if "replay_recipe_hours" in r else "-"
            lines.append(f"| steps that recorded no graph ({r['steps_recording']} of {r['steps_timed']} steps recorded "
                         f"{r['graphs_recorded']}) | " + " | ".join(cells) + f" | {hours} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: gloo, tiny model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/covt-multi-gpu"))
    ap.add_argument("--skip-precompute", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--throughput", metavar="RUNS",
                    help="instead: the trainer's samples/s at global batch 8, for runs GPUSxZEROxMICRO[xnockpt] "
                         "separated by commas, e.g. 1xnonex4xnockpt,4xzero2x2xnockpt,4xzero3x2xnockpt")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per throughput run (per stage with "
                                                             "--four-stages)")
    ap.add_argument("--four-stages", action="store_true",
                    help="--throughput over the recipe's four stages in miniature, figures per stage")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="trainer config overrides added to every throughput run, e.g. train.compile=true "
                         "train.lora.fp32_inputs=false train.packing=true (each run's folder name says which)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        rows = []
        for spec in args.throughput.split(","):
            gpus, zero, micro, *rest = spec.split("x")
            measure = four_stage_throughput if args.four_stages else throughput
            rows.append(measure(int(gpus), None if zero == "none" else zero, int(micro), rest != ["nockpt"],
                                args.work, args.steps, args.tiny, tuple(args.overrides)))
            rows[-1]["overrides"] = args.overrides
            print(json.dumps(rows[-1]), flush=True)
        if args.four_stages:
            print("samples/s at global batch 8, per stage:\n" + four_stage_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    result = {"gpus": args.gpus, "tiny": args.tiny}
    if not args.skip_precompute:
        result["precompute"] = precompute_ranks_agree(args.gpus, args.work, "cpu" if args.tiny else "auto")
        print(json.dumps(result["precompute"], indent=1), flush=True)
    result["zero3"] = zero3_recipe(args.gpus, args.work, args.tiny)
    print(json.dumps(result["zero3"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
