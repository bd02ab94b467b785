"""A synthetic visual world with exact ground truth, for the `make learn` experiment.

Each scene is a plain or two-tone background with 2-4 shapes (circle, square, triangle), each of its own
colour, small or large, drawn in order (a later shape covers an earlier one where they overlap). Every
question's answer follows from the scene description alone, and comes with multiple-choice options:

  count      How many shapes are in the image?
  colour     What colour is the leftmost / rightmost / topmost / bottommost shape?
  left_right Is the red shape to the left or to the right of the blue shape?
  above      Is the red shape above or below the blue shape?
  size       Which shape is larger, the red one or the blue one?
  occlusion  Two shapes overlap: which one is in front, the red one or the blue one?

The question text is VLMEvalKit's multiple-choice prompt (``inference.evaluate.mcq_prompt``), the answer the
option letter, so training (the parquet's conversations) and the benchmark (the TSV) ask the same way.

    python bench/learn/world.py --out runs/learn/world --train 4000 --held-out 200 --bench 300 --seed 0

writes ``train.parquet`` (the published CoVT schema: id, image {bytes, path}, image_relpath, conversations),
``base.parquet`` (the base model's samples: each training question, the same answered in a sentence, and the
scene's description; see :func:`describe`), ``held_out.json`` + ``held_out/`` (LLaVA JSON: ``data.validation``'s
held-out records) and ``bench.tsv`` (VLMEvalKit's layout: index, base64 image, question, A.., answer,
category). Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 50, 170), "white": (245, 245, 245)}
BACKGROUNDS = [(30, 30, 30), (90, 90, 90), (150, 120, 90), (60, 90, 110), (120, 140, 120), (170, 170, 190)]
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.11, "large": 0.2}  # radius as a share of the image side
QUESTION_TYPES = ("count", "colour", "left_right", "above", "size", "occlusion")
NUMBERS = ["one", "two", "three", "four", "five"]


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, as a share of the image side
    y: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def overlaps(self, other: Shape) -> bool:
        return (self.x - other.x) ** 2 + (self.y - other.y) ** 2 < (0.8 * (self.radius + other.radius)) ** 2


@dataclass(frozen=True)
class Scene:
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom colour
    shapes: tuple[Shape, ...]  # in drawing order: later ones are in front


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(2, 4)
    colours = rng.sample(list(COLOURS), count)
    top = rng.choice(BACKGROUNDS)
    bottom = top if rng.random() < 0.5 else rng.choice(BACKGROUNDS)
    shapes = []
    for colour in colours:
        size = rng.choice(list(SIZES))
        r = SIZES[size]
        shapes.append(Shape(rng.choice(SHAPES), colour, size, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)))
    return Scene((top, bottom), tuple(shapes))


def draw(scene: Scene, side: int) -> Image.Image:
    top, bottom = scene.background
    image = Image.new("RGB", (side, side), top)
    pen = ImageDraw.Draw(image)
    for row in range(side // 2, side):
        pen.line([(0, row), (side, row)], fill=bottom)
    for s in scene.shapes:
        cx, cy, r = s.x * side, s.y * side, s.radius * side
        if s.kind == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[s.colour])
        elif s.kind == "square":
            h = r * 0.85
            pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=COLOURS[s.colour])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=COLOURS[s.colour])
    return image


# ----------------------------------------------------------------------------- questions
def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, list[str], str] | None:
    """(question, options, correct option) of type ``kind`` about ``scene``; None where it has no clear answer."""
    shapes = scene.shapes
    if kind == "count":
        options = NUMBERS[1:5]
        return "How many shapes are in the image?", options, NUMBERS[len(shapes) - 1]
    if kind == "colour":
        where, key = rng.choice([("leftmost", lambda s: s.x), ("rightmost", lambda s: -s.x),
                                 ("topmost", lambda s: s.y), ("bottommost", lambda s: -s.y)])
        ordered = sorted(shapes, key=key)
        if abs(key(ordered[0]) - key(ordered[1])) < 0.08:
            return None
        others = [c for c in COLOURS if c != ordered[0].colour]
        options = sorted(rng.sample(others, 3) + [ordered[0].colour])
        return f"What colour is the {where} shape?", options, ordered[0].colour
    a, b = rng.sample(shapes, 2)
    if kind == "left_right":
        if abs(a.x - b.x) < 0.08:
            return None
        return (f"Is the {a.colour} shape to the left or to the right of the {b.colour} shape?",
                ["left", "right"], "left" if a.x < b.x else "right")
    if kind == "above":
        if abs(a.y - b.y) < 0.08:
            return None
        return f"Is the {a.colour} shape above or below the {b.colour} shape?", ["above", "below"], \
            "above" if a.y < b.y else "below"
    if kind == "size":
        if a.size == b.size:
            return None
        return (f"Which shape is larger, the {a.colour} one or the {b.colour} one?", sorted([a.colour, b.colour]),
                a.colour if a.size == "large" else b.colour)
    if kind == "occlusion":
        pairs = [(p, q) for i, p in enumerate(shapes) for q in shapes[i + 1:] if p.overlaps(q)]
        if not pairs:
            return None
        back, front = rng.choice(pairs)
        return (f"Two shapes overlap. Which one is in front, the {back.colour} one or the {front.colour} one?",
                sorted([back.colour, front.colour]), front.colour)
    raise ValueError(f"unknown question type {kind!r} (one of {QUESTION_TYPES})")


def mcq_text(question: str, options: list[str]) -> str:
    """VLMEvalKit's ImageMCQDataset prompt, as ``inference.evaluate.mcq_prompt`` builds it."""
    letters = "ABCDEFGH"
    return (f"Question: {question}\nOptions:\n" + "".join(f"{letters[i]}. {o}\n" for i, o in enumerate(options))
            + "Please select the correct answer from the options above. \n")


@dataclass(frozen=True)
class Sample:
    id: str
    image: Image.Image
    kind: str
    question: str
    options: list[str]
    answer: str  # the correct option's letter
    description: str  # the scene in sentences (the base model's language samples)


def position(s: Shape) -> str:
    rows, columns = ("top", "middle", "bottom"), ("left", "centre", "right")
    row, column = rows[min(int(s.y * 3), 2)], columns[min(int(s.x * 3), 2)]
    return "in the centre" if (row, column) == ("middle", "centre") else f"at the {row} {column}"


def describe(scene: Scene) -> str:
    """The scene in plain sentences: what a base model that knows the world and its language can say about it.

    They also use the words the CoVT formats ask for (the edge map, the depth map, the perception feature of the
    image, because), and separate sentences by two spaces as typewritten English does, which gives the lone space
    token (CoVT's formats put one before every added token: ``is <|anchor_start|>``, ``<answer> A </answer>``).
    A real base model knows all of them from pre-training; the tiny model's output rows of tokens it never
    produced stay at their random init, which LoRA (no lm_head rows) cannot lift."""
    shapes = scene.shapes
    listed = [f"a {s.size} {s.colour} {s.kind} {position(s)}" for s in shapes]
    sentences = [f"The image shows {NUMBERS[len(shapes) - 1]} shapes: {', '.join(listed[:-1])} and {listed[-1]}."]
    for i, back in enumerate(shapes):
        for front in shapes[i + 1:]:
            if back.overlaps(front):
                sentences.append(f"Because the {front.colour} {front.kind} is drawn after the {back.colour} "
                                 f"{back.kind}, the {front.colour} {front.kind} is in front.")
    colours = ", ".join(s.colour for s in shapes[:-1]) + f" and {shapes[-1].colour}"
    sentences.append(f"The edge map of the image is the outline of the {NUMBERS[len(shapes) - 1]} shapes, the depth "
                     f"map of the image is flat, and the perception feature of the image is {colours} on the "
                     "background.")
    return "  ".join(sentences)


def samples(count: int, seed: int, side: int) -> list[Sample]:
    """``count`` samples, question types in turn (a type a scene cannot answer draws a new scene)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        kind = QUESTION_TYPES[len(out) % len(QUESTION_TYPES)]
        scene = random_scene(rng)
        asked = ask(scene, kind, rng)
        if asked is None:
            continue
        question, options, correct = asked
        out.append(Sample(f"s{seed}-{len(out):06d}", draw(scene, side), kind, question, options,
                          "ABCDEFGH"[options.index(correct)], describe(scene)))
    return out


# ----------------------------------------------------------------------------- files
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


DESCRIBE = "Describe the image."


def conversation(s: Sample) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + mcq_text(s.question, s.options)},
            {"from": "gpt", "value": s.answer}]


SENTENCE = "Answer with a sentence."


def description(s: Sample) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{DESCRIBE}"}, {"from": "gpt", "value": s.description}]


def sentence_answer(s: Sample) -> list[dict]:
    """The question answered in a sentence ("The answer is B."): the letter after a space, as CoVT's
    ``<answer> B </answer>`` writes it."""
    return [{"from": "human", "value": "<image>\n" + mcq_text(s.question, s.options) + SENTENCE},
            {"from": "gpt", "value": f"The answer is {s.answer}."}]


def write_parquet(items: list[Sample], path: Path, describe: bool = False) -> None:
    """The published CoVT schema: id, image {bytes, path}, image_relpath, conversations [{from, value}];
    ``describe``: after each question sample, the same image with the question answered in a sentence and with
    its description (id suffixes ``-s``, ``-d``): the base model's samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(s.id, s, conversation(s)) for s in items]
    if describe:
        rows = [row for s in items for row in ((s.id, s, conversation(s)), (f"{s.id}-s", s, sentence_answer(s)),
                                               (f"{s.id}-d", s, description(s)))]
    table = pa.table({
        "id": [i for i, _, _ in rows],
        "image": [{"bytes": png_bytes(s.image), "path": f"{s.id}.png"} for _, s, _ in rows],
        "image_relpath": [f"world/{s.id}.png" for _, s, _ in rows],
        "conversations": [c for _, _, c in rows],
    })
    pq.write_table(table, path, row_group_size=256)


def write_llava(items: list[Sample], path: Path, image_folder: Path) -> None:
    image_folder.mkdir(parents=True, exist_ok=True)
    for s in items:
        s.image.save(image_folder / f"{s.id}.png")
    path.write_text(json.dumps([{"id": s.id, "image": f"{s.id}.png", "conversations": conversation(s)}
                                for s in items], indent=1) + "\n")


def write_bench(items: list[Sample], path: Path) -> None:
    """VLMEvalKit's MCQ TSV: index, image (base64), question, A.., answer, category."""
    letters = "ABCD"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "image", "question", *letters, "answer", "category"])
        for i, s in enumerate(items):
            options = s.options + [""] * (len(letters) - len(s.options))
            writer.writerow([i, base64.b64encode(png_bytes(s.image)).decode(), s.question, *options, s.answer,
                             s.kind])


def write_world(out: str | Path, train: int, held_out: int, bench: int, seed: int = 0, side: int = 112) -> Path:
    """Every file of the world under ``out``; the three splits come from different seeds (no shared scene)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    training = samples(train, seed * 3, side)
    write_parquet(training, out / "train.parquet")
    write_parquet(training, out / "base.parquet", describe=True)
    write_llava(samples(held_out, seed * 3 + 1, side), out / "held_out.json", out / "held_out")
    write_bench(samples(bench, seed * 3 + 2, side), out / "bench.tsv")
    return out


def world_text(out: str | Path) -> list[str]:
    """Every conversation turn of the world's base.parquet: the words its tokenizer should learn."""
    import pyarrow.parquet as pq

    conversations = pq.read_table(Path(out) / "base.parquet", columns=["conversations"]).column(0).to_pylist()
    return [turn["value"].replace("<image>\n", "") for c in conversations for turn in c]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/learn/world")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--bench", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=112, help="image side in pixels")
    a = p.parse_args(argv)
    print(write_world(a.out, a.train, a.held_out, a.bench, a.seed, a.side))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
