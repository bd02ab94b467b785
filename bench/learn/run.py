"""Show that it learns: the whole CoVT pipeline on a synthetic world, measured (`make learn`, `make learn-quick`).

    python bench/learn/run.py --out runs/learn            # one GPU
    python bench/learn/run.py --quick --out runs/learn-quick   # CPU, a few minutes

Steps, each through the project's own commands (a subprocess each; configs written here to OUT/configs):

1. the world (``bench/learn/world.py``): training parquet, held-out LLaVA JSON, held-out MCQ benchmark TSV;
2. ``python -m precompute``: PIDINet (real weights), DINOv2 and Depth Anything V2 (small random-weight models of
   the real architectures: fixed, image-dependent targets), the held-out records cached as ``data.validation``;
3. the base model: a small random-weight Qwen2.5-VL (``Plan.model``; its tokenizer also learns the world's words)
   trained full-parameter (``train.lora.enabled=false``, ``train.thoughts=false``) on ``base.parquet``: the plain
   question/answer pairs, the same questions answered in a sentence, and scene descriptions, so that it knows the
   world and the words CoVT's formats use (``bench/learn/world.py`` says why), ``OUT/base/final``;
4. the arms on that base, ``python -m trainer``: ``covt`` (the four stages with LoRA and both merges),
   ``covt_rows_first_run`` (the same with the added tokens' rows trained in the first run only, as the reference
   ran) and ``control`` (``train.thoughts=false``, the same schedule and data); ``--arm "NAME=key=value;..."``
   adds one with extra overrides (e.g. ``broken=train.loss_weights={pidinet: 0.0, ...}``);
5. ``python -m trainer evaluate`` on the benchmark (base, control, each CoVT arm with ``--ablate-thoughts``, and
   with ``--force-thoughts``), ``python -m trainer generate --thoughts --force-thoughts`` on held-out images;
6. ``bench/learn/report.py``: OUT/report.json, OUT/report.md and the pictures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.learn.world import world_text, write_world  # noqa: E402
from trainer.tiny_model import TinySize, build_tiny_base_model  # noqa: E402

ANCHORS = ["pidinet", "dino", "depth"]


@dataclass(frozen=True)
class Plan:
    """The experiment's sizes: one GPU (``FULL``) or a few CPU minutes (``QUICK``)."""

    train: int  # training samples (the base model trains on all of them)
    covt_samples: int | None  # of which the CoVT arms' cache holds the first N (None: all)
    held_out: int  # held-out samples (validation losses, thought decoding)
    bench: int  # benchmark questions
    base_steps: int  # full-parameter steps of the base model
    stage_steps: tuple[int, int, int, int]  # the four CoVT stages
    batch: int  # per optimizer step, the CoVT arms
    base_batch: int  # per optimizer step, the base model
    base_lr: float
    lr: float
    validate_every: int
    device: str
    pidinet_size: int = 112  # PIDINet's view (its first stage also runs in every training step, for the head)
    max_new_tokens: int = 96
    pictures: int = 2  # held-out images drawn with generate --thoughts
    eval_batch: int = 8  # questions per generate call in evaluate
    seed: int = 0
    side_by_side: bool = False  # independent runs (the arms, the evaluations) at the same time
    workers: int = 0  # DataLoader workers of each arm, and each precompute's image workers
    base_workers: int = 0  # DataLoader workers of the base model's run (it trains alone)
    model: TinySize = TinySize()  # the base model's sizes


FULL = Plan(train=12000, covt_samples=None, held_out=128, bench=300, base_steps=2400, eval_batch=32,
            stage_steps=(500, 250, 350, 250), batch=16, base_batch=16, base_lr=1e-3, lr=1e-3, validate_every=100,
            device="auto", side_by_side=True, workers=4, base_workers=8,
            model=TinySize(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, vision_hidden=256,
                           vision_intermediate=768, vision_depth=4, vision_heads=4))
# side by side: each process runs one thread (make learn-quick sets OMP_NUM_THREADS=1), so the arms compute the
# same numbers at the same time as one after the other, on as many cores as there are
QUICK = Plan(train=600, covt_samples=128, held_out=24, bench=60, base_steps=500, stage_steps=(60, 40, 250, 100),
             batch=4, base_batch=8, base_lr=2e-3, lr=5e-3, validate_every=75, device="cpu", pidinet_size=56,
             max_new_tokens=96, pictures=1, side_by_side=True)


def base_config(out: Path, plan: Plan) -> dict:
    """The config every run shares (world, cache, anchors, sizes); runs add their model, schedule and output."""
    world, checkpoints = out / "world", out / "checkpoints"
    return {
        "data": {"path": str(world / "train.parquet"), "validation": str(world / "held_out.json"),
                 "image_folder": str(world / "held_out"), "on_bad_record": "error",
                 "subset": {"size": plan.covt_samples, "seed": plan.seed}},
        "cache": {"dir": str(out / "cache"), "shard_size": 64, "codec": "bf16"},
        "anchors": ANCHORS,
        "precompute": {
            "device": plan.device, "dtype": "fp32", "batch_size": 16, "num_workers": plan.workers,
            "checkpoints": {
                "pidinet": {"path": str(REPO / "data/checkpoints/table5_baseline.pth"), "variant": "baseline",
                            "input_size": plan.pidinet_size},
                "dino": {"path": str(checkpoints / "dinov2_vit_tiny.pth"), "variant": "vit_tiny",
                         "random_init_seed": 2},
                "depth": {"path": str(checkpoints / "depth_anything_v2_vit_tiny.pth"), "variant": "vit_tiny",
                          "random_init_seed": 1},
            },
        },
        "model": {"path": str(out / "tiny_init"), "image_size": 112},
        "train": {"batch_size": plan.batch, "grad_accum": 1, "max_length": 512, "bf16": True,
                  "gradient_checkpointing": False, "save_every": 0, "log_every": 10, "seed": plan.seed,
                  "device": plan.device, "num_workers": plan.workers, "lr": plan.lr, "projection_lr": plan.lr,
                  "warmup_ratio": 0.05, "validate_every": plan.validate_every,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
    }


def plain_cache_overrides(out: Path) -> list[str]:
    """The base model's cache: every training sample, one cheap anchor (the trainer reads images through a cache)."""
    return [f"cache.dir={out / 'cache-plain'}", f"data.path={out / 'world' / 'base.parquet'}", "anchors=[dino]",
            "data.validation=null", "data.subset.size=null"]


def base_model_overrides(out: Path, plan: Plan) -> list[str]:
    """The base model: full-parameter training on the plain question/answer pairs."""
    stages = f"[{{name: understanding, steps: {plan.base_steps}, merge_after: true}}]"
    return [*plain_cache_overrides(out), f"train.output_dir={out / 'base'}", f"train.stages={stages}",
            "train.thoughts=false", f"train.batch_size={plan.base_batch}",
            "train.lora.enabled=false", f"train.num_workers={plan.base_workers}", f"train.lr={plan.base_lr}",
            f"train.projection_lr={plan.base_lr}", "train.validate_every=0"]


def covt_overrides(out: Path, plan: Plan, arm: str) -> list[str]:
    """An arm on the trained base: the four stages (stage 4's anchor losses off for its last quarter)."""
    s1, s2, s3, s4 = plan.stage_steps
    off_from = s2 + s3 + s4 - max(1, s4 // 4)
    stages = (f"[{{name: understanding, steps: {s1}, merge_after: true}}, {{name: generation, steps: {s2}}}, "
              f"{{name: reasoning, steps: {s3}}}, {{name: efficient_reasoning, steps: {s4}, "
              f"anchor_losses_off_from: {off_from}, merge_after: true}}]")
    return [f"model.path={out / 'base' / 'final'}", f"train.output_dir={out / arm}", f"train.stages={stages}"]


# covt: the added tokens' rows train in every run (the trainer's default); covt_rows_first_run: as the reference
# ran them (trained in the first run only, README "What the reference does as its code runs"), the candidate
# cause of its users' models skipping the chain (Wakals/CoVT issues 18, 31); control: the direct fine-tune
DEFAULT_ARMS = {"covt": [], "covt_rows_first_run": ["train.new_token_rows=first_run"],
                "control": ["train.thoughts=false"]}


@dataclass
class Experiment:
    out: Path
    plan: Plan
    arms: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.out / "configs" / "learn.yaml"

    def commands(self, jobs: dict[str, list[str]]) -> None:
        """name -> ``python ARGS`` from the repository root, output in OUT/logs/NAME.log, side by side when the plan
        says so (the GPU plan's small model leaves the card mostly idle, so its independent runs share it), else
        one after the other; a failure stops the experiment."""
        if not self.plan.side_by_side:
            for name, args in jobs.items():
                self.wait(*self.start(name, args))
            return
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(jobs))))  # the cores shared, not oversubscribed
        for running in [self.start(name, args, threads) for name, args in jobs.items()]:
            self.wait(*running)

    def start(self, name: str, args: list[str], threads: str | None = None
              ) -> tuple[str, subprocess.Popen, Path, float]:
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO))
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = threads
        print(f"[learn] {name}: python {' '.join(args)}", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        return name, proc, log, time.perf_counter()

    def wait(self, name: str, proc: subprocess.Popen, log: Path, started: float) -> None:
        returncode = proc.wait()
        self.timings[name] = round(time.perf_counter() - started, 1)
        print(f"[learn] {name}: exit {returncode} after {self.timings[name]} s", flush=True)
        if returncode != 0:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"step {name!r} failed (exit {returncode}); log {log}:\n{tail}")

    def train(self, runs: dict[str, list[str]]) -> dict[str, Path]:
        """Each run's final folder; runs whose final folder exists are not run again."""
        finals = {name: self.out / name / "final" for name in runs}
        self.commands({f"train-{name}": ["-m", "trainer", "--config", str(self.config), *overrides]
                       for name, overrides in runs.items() if not (finals[name] / "config.json").is_file()})
        return finals

    def evaluation_jobs(self, runs: dict[str, tuple[list[Path], tuple[str, ...]]]
                        ) -> tuple[dict[str, list[str]], dict[str, Path]]:
        """name -> (models, extra flags) to evaluate on the benchmark: the commands, and name -> its results.json."""
        jobs = {f"evaluate-{name}": [
            "-m", "trainer", "evaluate", *[a for m in models for a in ("--model", str(m))],
            "--benchmark", str(self.out / "world" / "bench.tsv"), "--out", str(self.out / "eval" / name),
            "--image-size", "112", "--max-new-tokens", str(self.plan.max_new_tokens),
            "--batch-size", str(self.plan.eval_batch), "--device", self.device, *flags]
            for name, (models, flags) in runs.items()}
        return jobs, {name: self.out / "eval" / name / "results.json" for name in runs}

    @property
    def device(self) -> str:
        if self.plan.device != "auto":
            return self.plan.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def picture_jobs(self, model: Path) -> tuple[dict[str, list[str]], list[Path]]:
        """``generate --thoughts --force-thoughts`` of the first held-out images: the commands, and the pictures."""
        held_out = json.loads((self.out / "world" / "held_out.json").read_text())
        jobs, drawn = {}, []
        for record in held_out[:self.plan.pictures]:
            picture = self.out / "pictures" / f"thoughts_{record['id']}.png"
            question = record["conversations"][0]["value"].replace("<image>\n", "")
            jobs[f"generate-{record['id']}"] = [
                "-m", "trainer", "generate", "--model", str(model), "--image",
                str(self.out / "world" / "held_out" / record["image"]), "--question", question, "--image-size", "112",
                "--max-new-tokens", str(self.plan.max_new_tokens), "--config", str(self.config),
                "--thoughts", str(picture), "--force-thoughts", "--device", self.device]
            drawn.append(picture)
        return jobs, drawn


def run(out: Path, plan: Plan, extra_arms: dict[str, list[str]] | None = None, fresh: bool = False) -> dict:
    """The whole experiment; returns the report (also written to OUT/report.json and OUT/report.md)."""
    from bench.learn.report import write_report

    if fresh and out.exists():
        shutil.rmtree(out)
    exp = Experiment(out, plan)
    exp.arms.update(extra_arms or {})
    if not (out / "world" / "bench.tsv").is_file():
        write_world(out / "world", plan.train, plan.held_out, plan.bench, seed=plan.seed)
    if not (out / "tiny_init" / "config.json").is_file():
        build_tiny_base_model(out / "tiny_init", seed=plan.seed, image_size=112, size=plan.model,
                              extra_text=world_text(out / "world"))
    exp.config.parent.mkdir(parents=True, exist_ok=True)
    exp.config.write_text(yaml.safe_dump(base_config(out, plan), sort_keys=False))
    exp.commands({"precompute-plain": ["-m", "precompute", "--config", str(exp.config), *plain_cache_overrides(out)],
                  "precompute": ["-m", "precompute", "--config", str(exp.config)]})
    base = exp.train({"base": base_model_overrides(out, plan)})["base"]
    finals = exp.train({arm: covt_overrides(out, plan, arm) + overrides for arm, overrides in exp.arms.items()})
    thinking = [finals[a] for a in finals if "train.thoughts=false" not in exp.arms[a]]
    plain = [base] + [finals[a] for a in finals if "train.thoughts=false" in exp.arms[a]]
    evaluations, results = exp.evaluation_jobs({"plain": (plain, ()), "thinking": (thinking, ("--ablate-thoughts",)),
                                                "forced": (thinking, ("--force-thoughts",))})
    drawing, pictures = exp.picture_jobs(finals["covt"])
    exp.commands({**evaluations, **drawing})
    return write_report(exp, finals, results, pictures)


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=key=value[;key=value...]")
    return name, overrides.split(";")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="default runs/learn (runs/learn-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the CPU variant: a smaller world, fewer steps")
    p.add_argument("--arm", action="append", type=parse_arm, default=[], metavar="NAME=OVERRIDES",
                   help="another CoVT arm with extra trainer overrides, separated by ;")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (otherwise finished runs are reused)")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    out = Path(a.out or ("runs/learn-quick" if a.quick else "runs/learn"))
    report = run(out.resolve(), plan, dict(a.arm), fresh=a.fresh)
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
