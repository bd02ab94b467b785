"""Multiple-choice benchmarks in VLMEvalKit's TSV layout, one or several models side by side.

``python -m trainer evaluate --model DIR [--model DIR2 ...] --benchmark FILE.tsv [--ablate-thoughts]``

Read top to bottom: :func:`read_benchmark` (VLMEvalKit's columns: ``index``, ``image`` as base64 or
the index of a row that holds it, ``question``, options ``A``, ``B``, ... , ``answer``, ``category``,
optional ``hint``), :func:`mcq_prompt` (VLMEvalKit's ``ImageMCQDataset.build_prompt``, the prompt the
CoVT model class receives, since its entries set ``use_custom_prompt=False``), generation through
:mod:`inference.generate` (chat template with the generation prompt, pixels in [1280x28x28, 16384x28x28],
``skip_special_tokens=True``, the answer from ``<answer>...</answer>``), :func:`match_option` (VLMEvalKit's
exact matching, what it scores with when no judge model is configured), then :func:`score` and
:func:`markdown_table`. Results go to ``OUT/results.json`` and ``OUT/results.md``.

VLMEvalKit's CoVT class samples with top_k=1, which is greedy decoding; this module decodes greedily.
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import io
import json
import string
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from covt.console import add_verbose_argument, setup_console
from inference.generate import (
    GenerationSettings,
    ImageSizing,
    add_generation_arguments,
    generate_answers,
    load_model,
    settings_from_args,
    sizing_from_args,
)

REQUIRED_COLUMNS = ("index", "image", "question", "answer")
NO_ANSWER = ""


@dataclass
class Question:
    index: str
    image: Image.Image
    question: str
    options: dict[str, str]  # letter -> option text, in letter order
    answer: str  # the correct letter
    category: str
    hint: str | None = None


# ----------------------------------------------------------------------------- benchmark in
def read_benchmark(path: str | Path) -> list[Question]:
    """The rows of a VLMEvalKit MCQ TSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--benchmark {path}: file not found")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"--benchmark {path}: no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"--benchmark {path}: missing columns {missing} (VLMEvalKit MCQ TSVs have "
                         f"{list(REQUIRED_COLUMNS)} + options A, B, ... + category)")
    by_index = {row["index"]: row for row in rows}
    return [_question(row, by_index, path) for row in rows]


def _question(row: dict, by_index: dict[str, dict], path: Path) -> Question:
    where = f"--benchmark {path}, row index {row['index']}"
    image = row["image"]
    if image in by_index and image != row["index"]:  # VLMEvalKit stores a repeated image once, others point at it
        image = by_index[image]["image"]
    try:
        decoded = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    except Exception as e:
        raise ValueError(f"{where}: the image column is not a base64 image ({type(e).__name__}: {e})") from None
    options = {c: row[c] for c in string.ascii_uppercase if row.get(c) not in (None, "", "nan", "NaN")}
    answer = row["answer"].strip()
    if answer not in options:
        raise ValueError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
    hint = row.get("hint")
    return Question(index=row["index"], image=decoded, question=row["question"], options=options, answer=answer,
                    category=row.get("category") or "all", hint=hint if hint not in (None, "", "nan") else None)


def mcq_prompt(q: Question) -> str:
    """VLMEvalKit's ImageMCQDataset.build_prompt text (the image comes before it in the user turn)."""
    prompt = f"Hint: {q.hint}\n" if q.hint else ""
    prompt += f"Question: {q.question}\n"
    if q.options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in q.options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


# ----------------------------------------------------------------------------- answers out
def match_option(answer: str, options: dict[str, str]) -> str:
    """The option letter an answer names, by VLMEvalKit's exact matching (``can_infer``), or ``NO_ANSWER``.

    First the letters: punctuation becomes spaces, and if exactly one option letter is a word of the answer
    and it appears among its last five words, that letter. Else the texts: if exactly one option's text
    occurs in the answer (case-insensitive), its letter.
    """
    words = answer
    for c in ".()[],:;!*#{}":
        words = words.replace(c, " ")
    words = words.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    lowered = answer.lower()
    texts = [letter for letter, text in options.items() if text.strip() and text.strip().lower() in lowered]
    return texts[0] if len(texts) == 1 else NO_ANSWER


@dataclass
class ModelResult:
    name: str
    model: str
    ablated: bool
    forced: bool = False  # --force-thoughts: every answer started with the chain's opening
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.predictions)
        by_category: dict[str, list[bool]] = defaultdict(list)
        for p in self.predictions:
            by_category[p["category"]].append(p["correct"])
        return {
            "name": self.name, "model": self.model, "ablated_thoughts": self.ablated,
            "forced_thoughts": self.forced, "questions": n,
            "accuracy": _mean(p["correct"] for p in self.predictions),
            "categories": {c: _mean(v) for c, v in sorted(by_category.items())},
            "answered": _mean(p["choice"] != NO_ANSWER for p in self.predictions),
            "thought_rate": _mean(bool(p["thoughts"]) for p in self.predictions),
        }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_questions(vlm, processor, questions: list[Question], sizing: ImageSizing, settings: GenerationSettings,
                  batch_size: int, name: str, folder: str) -> ModelResult:
    """Every question through one model, with a progress bar."""
    result = ModelResult(name=name, model=str(folder), ablated=settings.ablate, forced=settings.force_thoughts)
    bar = tqdm(total=len(questions), desc=name, unit="q", dynamic_ncols=True)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        generated = generate_answers(vlm, processor, [q.image for q in batch], [mcq_prompt(q) for q in batch],
                                     sizing, settings, names=[q.index for q in batch])
        for q, a in zip(batch, generated.answers):
            choice = match_option(a.answer, q.options)
            result.predictions.append({"index": q.index, "category": q.category, "answer": q.answer,
                                       "choice": choice, "correct": choice == q.answer, "prediction": a.answer,
                                       "text": a.text, "thoughts": a.thoughts,
                                       "thought_pads": a.pads_written})
        bar.update(len(batch))
    bar.close()
    return result


def markdown_table(summaries: list[dict]) -> str:
    """Rows: overall, each category, answered, visual thoughts emitted; one column per model (percent)."""
    categories = sorted({c for s in summaries for c in s["categories"]})
    header = "| | " + " | ".join(s["name"] for s in summaries) + " |"
    rows = [header, "|---|" + "---|" * len(summaries)]

    def row(label: str, values) -> None:
        rows.append(f"| {label} | " + " | ".join("–" if v != v else f"{100 * v:.1f}" for v in values) + " |")

    row(f"**overall** ({summaries[0]['questions']} questions)", [s["accuracy"] for s in summaries])
    for c in categories:
        row(c, [s["categories"].get(c, float("nan")) for s in summaries])
    row("answered (an option matched)", [s["answered"] for s in summaries])
    row("visual thoughts emitted", [s["thought_rate"] for s in summaries])
    return "\n".join(rows)


def model_names(folders: list[str]) -> list[str]:
    """Short column names: the folder's last parts, as many as make them distinct."""
    parts = [Path(f).resolve().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def evaluate(folders: list[str], benchmark: str, out: str | Path, sizing: ImageSizing, settings: GenerationSettings,
             ablate: bool = False, batch_size: int = 1, device: str = "cpu") -> dict:
    """Evaluate every model; with ``ablate``, each model that wrote visual thought pads once more, its thoughts
    ablated. A model that wrote none (a base model, the control) would answer the same word for word: the
    ablation acts only at pad positions, so it is not run again."""
    questions = read_benchmark(benchmark)
    results = []
    for folder, name in zip(folders, model_names(folders)):
        name += " (thoughts forced)" if settings.force_thoughts else ""
        name += " (training prompt)" if settings.prompt_layout == "training" else ""
        vlm, processor = load_model(folder, device=device)
        results.append(run_questions(vlm, processor, questions, sizing, settings, batch_size, name, folder))
        if ablate and any(p["thought_pads"] for p in results[-1].predictions):
            ablated = dataclasses.replace(settings, ablate=True)
            results.append(run_questions(vlm, processor, questions, sizing, ablated, batch_size,
                                         f"{name} (thoughts ablated)", folder))
        elif ablate:
            print(f"{name}: wrote no visual thought, so it is not run again with its thoughts ablated (it would "
                  "answer the same)", file=sys.stderr)
        del vlm
    summaries = [r.summary() for r in results]
    report = {"benchmark": str(benchmark), "questions": len(questions), "models": summaries,
              "generation": {**dataclasses.asdict(settings), **dataclasses.asdict(sizing)},
              "predictions": {r.name: r.predictions for r in results}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(summaries)
    (out / "results.md").write_text(f"{Path(benchmark).name}: accuracy in percent\n\n{table}\n")
    report["table"] = table
    return report


# ----------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="model folder (final/, a merged run or a base model); repeat to compare side by side")
    p.add_argument("--benchmark", required=True, metavar="FILE.tsv", help="VLMEvalKit multiple-choice TSV")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="where results.json / results.md go")
    p.add_argument("--ablate-thoughts", action="store_true",
                   help="also run each model that wrote visual thoughts with their hidden states replaced by a "
                        "fixed vector")
    add_generation_arguments(p, max_new_tokens=2048)
    p.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default 1, as VLMEvalKit)")
    add_verbose_argument(p)
    a = p.parse_args(argv)
    setup_console(a.verbose)
    report = evaluate(a.model, a.benchmark, a.out, sizing_from_args(a), settings_from_args(a),
                      ablate=a.ablate_thoughts, batch_size=a.batch_size, device=a.device)
    print(report["table"])
    print(f"results: {Path(a.out) / 'results.json'}, {Path(a.out) / 'results.md'}")
    return 0
