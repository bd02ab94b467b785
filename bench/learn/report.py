"""The `make learn` report: does the model form visual thoughts, decode them into the anchors' outputs, use them?

Read by :func:`write_report` (called by ``bench/learn/run.py`` once every command ran). What it measures:

- per anchor, the validation loss (held-out samples, stage 3's format, ``metrics.jsonl``) at the first and last
  validation of each run, beside the loss of predicting the training set's mean target (the floor a model
  reaches without looking at the image);
- on the held-out images, the thoughts the trained model generated, decoded by its heads and compared with the
  anchor's own output (PIDINet edges: L1 and F-score; DINO features: cosine; Depth: L1), beside the mean target
  and beside the same model's thoughts of *another* held-out image (PIDINet's head convolves the image's own
  first-stage features, so any kernel gives an image-shaped map: only "own thoughts better than another image's"
  says the thoughts carry what this image holds);
- the share of held-out answers that emit every anchor's thought (stage 3's chain), a subset (stage 4), none:
  prompted as VLMEvalKit does (the chat template), as training did (``--prompt-layout training``), and with the
  chain's opening prefilled (``--force-thoughts``);
- accuracy per question type for every evaluated model with n and a 95% Wilson interval, and paired differences
  (CoVT - control, CoVT - ablated, CoVT - base) with a 95% interval.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

TARGET_ARRAY = {"pidinet": "edges", "dino": "features", "depth": "depth"}  # what each head's loss compares with
EDGE_THRESHOLD = 0.5
MEAN_TARGET_SAMPLES = 2048  # training samples the mean target is taken over, at most


# ----------------------------------------------------------------------------- statistics
def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> dict:
    """Mean of a - b over the same questions, with a normal 95% interval of the paired differences."""
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    half = z * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"difference": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "exceeds_noise": bool(abs(d.mean()) > half)}


def f_score(prediction: np.ndarray, target: np.ndarray, threshold: float = EDGE_THRESHOLD) -> float:
    p, t = prediction > threshold, target > threshold
    tp = float((p & t).sum())
    if not p.any() and not t.any():
        return 1.0
    return 2 * tp / max(float(p.sum() + t.sum()), 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the rows (the last axis) of a and b."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)).mean())


# ----------------------------------------------------------------------------- validation losses
def validation_curve(run_dir: Path) -> dict[int, list[dict]]:
    """run index -> the validation points of that run, [{"step", losses...}]."""
    by_run: dict[int, list[dict]] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if "validation" in record:
            by_run.setdefault(record["run"], []).append({"step": record["step"], **record["validation"]})
    return by_run


def run_speed(run_dir: Path) -> dict:
    """Median seconds per optimizer step of a run and, of them, the wait for the loader (``perf-rank0.jsonl``;
    the first step of each session, which starts the loader's workers, left out)."""
    path = run_dir / "perf-rank0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = [r for i, r in enumerate(rows) if i and r["step"] == rows[i - 1]["step"] + 1]
    if not rows:
        return {}
    seconds = float(np.median([r["seconds"] for r in rows]))
    data = float(np.median([r.get("data_seconds", float("nan")) for r in rows]))
    return {"steps": len(rows), "step_seconds": seconds, "data_seconds": data, "steps_per_second": 1 / seconds}


def mean_targets(cache_dir: Path, anchors: list[str], at_most: int = MEAN_TARGET_SAMPLES
                 ) -> dict[str, torch.Tensor]:
    """The training set's mean target of each anchor (the array its head's loss compares with), over every
    sample or, in a larger cache, ``at_most`` of them evenly spaced (a sample is read in ~10 ms: all 12,000 of
    the GPU plan would take two minutes, for a mean that 2,048 already pin down)."""
    from shards.reader import Cache

    cache = Cache(cache_dir)
    try:
        indices = np.unique(np.linspace(0, len(cache) - 1, min(len(cache), at_most)).round().astype(int))
        sums: dict[str, torch.Tensor] = {}
        for i in indices.tolist():
            for anchor, arrays in cache.targets(i, anchors).items():
                value = arrays[TARGET_ARRAY[anchor]].double()
                sums[anchor] = sums[anchor] + value if anchor in sums else value
        return {a: (s / len(indices)).float() for a, s in sums.items()}
    finally:
        cache.close()


def held_out_samples(cache_dir: Path, anchors: list[str]) -> list[dict]:
    from shards.layout import validation_cache_dir
    from shards.reader import Cache

    cache = Cache(validation_cache_dir(cache_dir))
    try:
        return [cache.sample(i, anchors) for i in range(len(cache))]
    finally:
        cache.close()


def baseline_losses(heads, means: dict[str, torch.Tensor], samples: list[dict]) -> dict[str, float]:
    """Each head's loss when it predicts the mean target for every held-out sample."""
    out = {}
    with torch.no_grad():
        for anchor, mean in means.items():
            losses = [float(heads[anchor].loss(mean[None], {k: v[None] for k, v in s["targets"][anchor].items()}))
                      for s in samples]
            out[anchor] = float(np.mean(losses))
    return out


# ----------------------------------------------------------------------------- held-out thoughts
def decode_metrics(anchor: str, decoded: np.ndarray, target: np.ndarray) -> dict[str, float]:
    if anchor == "pidinet":
        return {"l1": float(np.abs(decoded - target).mean()), "f_score": f_score(decoded, target)}
    if anchor == "dino":
        return {"cosine": cosine(decoded, target)}
    return {"l1": float(np.abs(decoded - target).mean())}


def held_out_thoughts(final: Path, samples: list[dict], means: dict[str, torch.Tensor], image_size: int,
                      max_new_tokens: int, device: str, heads=None, batch_size: int = 16) -> dict:
    """Generate on every held-out sample, freely and with the chain's opening prefilled (``--force-thoughts``);
    decode the forced answers' thoughts (own, another image's) and the mean target with the model's trained
    heads (or ``heads``, e.g. untrained ones)."""
    from inference.generate import Generated, GenerationSettings, ImageSizing, generate_answers, load_model
    from inference.thoughts import thought_states
    from trainer.loading import load_covt_heads

    vlm, processor = load_model(final, device=device)
    heads = (heads if heads is not None else load_covt_heads(final)).to(vlm.device)
    anchors = list(heads.keys())
    sizing = ImageSizing(image_size=image_size)

    def generate(batch: list[dict], force: bool, layout: str = "chat_template"):
        questions = [s["conversations"][0]["value"].replace("<image>\n", "") for s in batch]
        return generate_answers(vlm, processor, [s["images"][0] for s in batch], questions, sizing,
                                GenerationSettings(max_new_tokens=max_new_tokens, force_thoughts=force,
                                                   prompt_layout=layout))

    def batches(force: bool, layout: str = "chat_template") -> list[Generated]:  # one row per sample
        return [g.row(j) for i in range(0, len(samples), batch_size)
                for g in [generate(samples[i:i + batch_size], force, layout)] for j in range(len(g.answers))]

    free, free_training_layout = batches(False), batches(False, "training")
    forced = batches(True)
    states = [thought_states(vlm, processor, g, s["images"][0], anchors, image_size) for g, s in zip(forced, samples)]
    per_sample = [decode_sample(heads, s, states[i], states[(i + 1) % len(samples)], means, vlm.device)
                  for i, s in enumerate(samples)]
    def shares(rows: list[Generated]) -> dict:
        return emission_shares([g.answers[0].thoughts for g in rows], anchors)

    return {"anchors": anchors, "emission": shares(free), "emission_training_prompt": shares(free_training_layout),
            "forced_emission": shares(forced),
            "decoding": summarise_decoding(per_sample, anchors)}


def decode_sample(heads, s: dict, own_states: dict, other_states: dict, means: dict[str, torch.Tensor],
                  device) -> dict:
    """anchor -> metrics of the decoding of this sample's thoughts, of another image's, and of the mean target,
    each against the anchor's own output for this sample."""
    from trainer.heads.base import head_views

    row = {}
    for anchor, head in heads.items():
        size = getattr(head, "view_size", None)
        views = head_views([s["images"][0]], size).to(device) if size else None
        targets = {k: v[None].to(device) for k, v in s["targets"][anchor].items()}
        target = s["targets"][anchor][TARGET_ARRAY[anchor]].float().numpy()
        with torch.no_grad():
            own = head.decode(own_states[anchor][0].float(), targets, views)[0].float().cpu().numpy()
            swapped = head.decode(other_states[anchor][0].float(), targets, views)[0].float().cpu().numpy()
        row[anchor] = {"source": own_states[anchor][1], "own": decode_metrics(anchor, own, target),
                       "other_image": decode_metrics(anchor, swapped, target),
                       "mean_target": decode_metrics(anchor, means[anchor].numpy(), target)}
    return row


def emission_shares(emitted: list[list[str]], anchors: list[str]) -> dict:
    n = len(emitted)
    every = sum(set(anchors) <= set(e) for e in emitted)
    some = sum(bool(e) and not set(anchors) <= set(e) for e in emitted)
    return {"n": n, "stage3_every_anchor": every / n, "stage4_subset": some / n,
            "none": (n - every - some) / n, "per_anchor": {a: sum(a in e for e in emitted) / n for a in anchors}}


def summarise_decoding(per_sample: list[dict], anchors: list[str]) -> dict:
    out = {}
    for anchor in anchors:
        rows = [r[anchor] for r in per_sample]
        out[anchor] = {
            "generated_share": sum(r["source"] == "generated" for r in rows) / len(rows),
            **{kind: {metric: float(np.mean([r[kind][metric] for r in rows])) for metric in rows[0][kind]}
               for kind in ("own", "other_image", "mean_target")}}
    return out


# ----------------------------------------------------------------------------- accuracy
def accuracy_table(results_files: list[Path]) -> dict[str, dict]:
    """model column -> {"overall"/category: {"n", "accuracy", "ci95"}, "correct": [...], "thought_rate"}."""
    models: dict[str, dict] = {}
    for path in results_files:
        report = json.loads(Path(path).read_text())
        summaries = {s["name"]: s for s in report["models"]}
        for column, predictions in report["predictions"].items():
            name = arm_column(summaries[column])
            cells = {}
            for category in ["overall", *sorted({p["category"] for p in predictions})]:
                chosen = [p["correct"] for p in predictions if category in ("overall", p["category"])]
                cells[category] = {"n": len(chosen), "accuracy": float(np.mean(chosen)),
                                   "ci95": list(wilson(sum(chosen), len(chosen)))}
            models[name] = {**cells, "correct": [p["correct"] for p in predictions],
                            "thought_rate": summaries[column]["thought_rate"]}
    return models


def arm_column(summary: dict) -> str:
    """The arm's name (its run folder: base, covt, control, ...) and the variant, e.g. "covt (thoughts ablated)";
    evaluate names a column by as few folder parts as tell its models apart, which differs between calls."""
    variant = summary["name"][summary["name"].find(" ("):] if " (" in summary["name"] else ""
    return Path(summary["model"]).parent.name + variant


def comparisons(models: dict[str, dict], arm: str = "covt") -> dict[str, dict]:
    pairs = {"covt - control": (arm, "control"), "covt - ablated": (arm, f"{arm} (thoughts ablated)"),
             "covt - base": (arm, "base"), "covt forced - covt": (f"{arm} (thoughts forced)", arm)}
    return {label: paired_difference(models[a]["correct"], models[b]["correct"])
            for label, (a, b) in pairs.items() if a in models and b in models}


# ----------------------------------------------------------------------------- the report
def timed(exp, name: str, work):
    """``work()``, its time recorded in ``exp.timings`` and printed as the experiment's steps print theirs."""
    started = time.perf_counter()
    print(f"[learn] {name} ...", flush=True)
    result = work()
    exp.timings[name] = round(time.perf_counter() - started, 1)
    print(f"[learn] {name}: done after {exp.timings[name]} s", flush=True)
    return result


def write_report(exp, finals: dict[str, Path], results: dict[str, Path], pictures: list[Path]) -> dict:
    from trainer.loading import load_covt_heads

    cache = exp.out / "cache"
    thinking = [a for a in finals if "train.thoughts=false" not in exp.arms[a]]
    heads = load_covt_heads(finals[thinking[0]])
    anchors = list(heads.keys())
    means = timed(exp, "report-mean-targets", lambda: mean_targets(cache, anchors))
    samples = held_out_samples(cache, anchors)
    held_out = {a: timed(exp, f"report-thoughts-{a}", lambda a=a: held_out_thoughts(
        finals[a], samples, means, 112, exp.plan.max_new_tokens, exp.device, batch_size=exp.plan.eval_batch))
        for a in thinking}
    report = {"plan": dataclasses.asdict(exp.plan),
              "arms": exp.arms, "timings_s": exp.timings, "anchors": anchors,
              "mean_target_loss": baseline_losses(heads, means, samples),
              "validation": {a: validation_curve(exp.out / a) for a in finals},
              "speed": {a: run_speed(exp.out / a) for a in ["base", *finals]},
              "held_out_thoughts": held_out,
              "accuracy": accuracy_table(list(results.values())),
              "pictures": [str(p.relative_to(exp.out)) for p in pictures]}
    report["comparisons"] = comparisons(report["accuracy"])
    report["markdown"] = markdown(report)
    (exp.out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (exp.out / "report.md").write_text(report["markdown"] + "\n")
    draw_curves(report, exp.out / "pictures" / "validation.png")
    return report


def fmt(value: float, digits: int = 4) -> str:
    return "–" if value != value else f"{value:.{digits}g}"


def markdown(report: dict) -> str:
    lines = ["## Validation loss per anchor (held-out, stage 3 format): first and last point of each run", "",
             "| arm | anchor | " + " | ".join(f"run {r} first / last" for r in (0, 1)) + " | mean-target loss |",
             "|---|---|---|---|---|"]
    for arm, runs in report["validation"].items():
        for anchor in report["anchors"]:
            cells = []
            for r in ("0", "1") if "0" in runs else (0, 1):
                points = runs.get(r, [])
                cells.append(f"{fmt(points[0].get(anchor, float('nan')))} (step {points[0]['step']}) / "
                             f"{fmt(points[-1].get(anchor, float('nan')))} (step {points[-1]['step']})"
                             if points else "–")
            lines.append(f"| {arm} | {anchor} | {' | '.join(cells)} | {fmt(report['mean_target_loss'][anchor])} |")
    lines += ["", "## Held-out visual thoughts (generated with the chain's opening prefilled), decoded by the heads, "
              "against the anchor's own output", "",
              "| arm | anchor | generated | metric | own thoughts | another image's thoughts | mean target |",
              "|---|---|---|---|---|---|---|"]
    for arm, held in report["held_out_thoughts"].items():
        for anchor, d in held["decoding"].items():
            for metric in d["own"]:
                lines.append(f"| {arm} | {anchor} | {100 * d['generated_share']:.0f}% | {metric} | "
                             f"{fmt(d['own'][metric])} | {fmt(d['other_image'][metric])} | "
                             f"{fmt(d['mean_target'][metric])} |")
    lines += ["", "## Share of held-out answers that emit complete visual thoughts", "",
              "| arm | generation | n | every anchor (stage 3) | a subset (stage 4) | none |",
              "|---|---|---|---|---|---|"]
    for arm, held in report["held_out_thoughts"].items():
        for kind, label in (("emission", "free"), ("emission_training_prompt", "free, training's prompt layout"),
                            ("forced_emission", "chain opening prefilled")):
            e = held[kind]
            lines.append(f"| {arm} | {label} | {e['n']} | {100 * e['stage3_every_anchor']:.1f}% | "
                         f"{100 * e['stage4_subset']:.1f}% | {100 * e['none']:.1f}% |")
    lines += accuracy_markdown(report) + speed_markdown(report)
    return "\n".join(lines)


def speed_markdown(report: dict) -> list[str]:
    lines = ["", "## Training speed per run (medians over its steps; the arms train side by side: on one card in "
             "the GPU plan, one thread each in the CPU plan)", "",
             "| run | steps | seconds per step | of which waiting for data | steps/s |", "|---|---|---|---|---|"]
    for run, speed in report.get("speed", {}).items():
        if speed:
            lines.append(f"| {run} | {speed['steps']} | {speed['step_seconds']:.3f} | {speed['data_seconds']:.3f} | "
                         f"{speed['steps_per_second']:.1f} |")
    return lines


def accuracy_markdown(report: dict) -> list[str]:
    models = report["accuracy"]
    names = list(models)
    categories = [c for c in next(iter(models.values())) if c not in ("correct", "thought_rate")]
    lines = ["", "## Benchmark accuracy (%) per question type, n and 95% Wilson interval", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in categories:
        cells = [f"{100 * models[m][c]['accuracy']:.1f} [{100 * models[m][c]['ci95'][0]:.0f}, "
                 f"{100 * models[m][c]['ci95'][1]:.0f}]" for m in names]
        lines.append(f"| {c} (n={models[names[0]][c]['n']}) | " + " | ".join(cells) + " |")
    lines.append("| visual thoughts emitted | " + " | ".join(f"{100 * models[m]['thought_rate']:.1f}"
                                                           for m in names) + " |")
    lines += ["", "| paired difference (overall) | points | 95% interval | beyond noise |", "|---|---|---|---|"]
    for label, d in report["comparisons"].items():
        lines.append(f"| {label} | {100 * d['difference']:+.1f} | [{100 * d['ci95'][0]:+.1f}, "
                     f"{100 * d['ci95'][1]:+.1f}] | {'yes' if d['exceeds_noise'] else 'no'} |")
    return lines


def draw_curves(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = report["anchors"]
    fig, axes = plt.subplots(1, len(anchors), figsize=(4 * len(anchors), 3.2), squeeze=False)
    for ax, anchor in zip(axes[0], anchors):
        for arm, runs in report["validation"].items():
            points = [p for r in sorted(runs, key=int) for p in runs[r] if anchor in p]
            if points:
                ax.plot([p["step"] for p in points], [p[anchor] for p in points], marker=".", label=arm)
        ax.axhline(report["mean_target_loss"][anchor], color="gray", linestyle="--", label="mean target")
        ax.set_title(f"{anchor}: held-out loss", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
