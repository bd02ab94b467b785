"""The command line of using a trained model: ``python -m inference generate|evaluate ...``, which
``python -m trainer generate|evaluate`` forwards to (``--help`` on each).

``generate`` answers questions (inference/generate.py) and, with ``--thoughts``, draws the visual thoughts
(inference/thoughts.py, which runs precompute's anchor models); it lives here, above both modules, so
that neither imports the other's command line.
"""
from __future__ import annotations

import argparse
import json
import sys

from covt.console import add_verbose_argument, setup_console
from inference import evaluate, generate
from inference.generate import (
    add_generation_arguments,
    format_answer,
    generate_answers,
    load_model,
    open_image,
    read_questions,
    settings_from_args,
    sizing_from_args,
)
from inference.thoughts import draw_thoughts


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer generate", description=generate.__doc__.split("\n")[0])
    p.add_argument("--model", required=True, metavar="DIR", help="trained model folder, e.g. runs/tiny/train/final")
    p.add_argument("--image", metavar="IMG", help="image file (with --question)")
    p.add_argument("--question", metavar="Q", help="question about --image")
    p.add_argument("--questions", metavar="FILE", help='JSON list or JSONL of {"image": ..., "question": ...}')
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call with --questions")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer instead of text")
    p.add_argument("--thoughts", metavar="OUT.png",
                   help="decode the visual thoughts with the trained heads and draw them beside the anchors' outputs "
                        "(one question; runs the anchors named by --config)")
    p.add_argument("--config", default="configs/tiny.yaml",
                   help="with --thoughts: the anchors' checkpoints and views (precompute.*), "
                        "the training view (model.image_size)")
    add_generation_arguments(p, max_new_tokens=512)
    add_verbose_argument(p)
    a = p.parse_args(argv)
    setup_console(a.verbose)
    if a.questions:
        if a.image or a.question or a.thoughts:
            p.error("--questions replaces --image/--question and cannot be combined with --thoughts")
        items = read_questions(a.questions)
    elif a.image and a.question:
        items = [{"image": a.image, "question": a.question}]
    else:
        p.error("give --image IMG --question Q, or --questions FILE")
    vlm, processor = load_model(a.model, device=a.device)
    sizing, settings = sizing_from_args(a), settings_from_args(a)
    for start in range(0, len(items), a.batch_size):
        batch = items[start:start + a.batch_size]
        generated = generate_answers(vlm, processor, [open_image(i["image"]) for i in batch],
                                     [i["question"] for i in batch], sizing, settings,
                                     names=[i["image"] for i in batch])
        for answer in generated.answers:
            print(json.dumps(answer.to_dict()) if a.json else format_answer(answer) + "\n", flush=True)
    if a.thoughts:
        print(f"thoughts drawn: {draw_thoughts(a.model, a.config, vlm, processor, generated, a.thoughts)}")
    return 0


COMMANDS = {"generate": generate_main, "evaluate": evaluate.main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m inference {{{','.join(COMMANDS)}}} ... (--help on each)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
