"""Writes bench_tiny.tsv: a multiple-choice benchmark in VLMEvalKit's TSV layout built from the sample photos.

Columns as VLMEvalKit's MCQ datasets have them: index, image (base64 JPEG), question, A-D, answer,
category. Images are shrunk to at most 160 px a side to keep the file small. Rerun after editing
QUESTIONS: ``.venv/bin/python data/sample/make_bench_tiny.py``.
"""
import base64
import csv
import io
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
# (image, category, question, options A-D, answer)
QUESTIONS = [
    ("astronaut.jpg", "object", "What is the person wearing?",
     ["A business suit", "A white spacesuit", "A diving suit", "A raincoat"], "B"),
    ("astronaut.jpg", "scene", "What is behind the person?",
     ["A flag and a spacecraft model", "A forest", "The ocean", "A blackboard"], "A"),
    ("chelsea.jpg", "object", "What animal is in the image?", ["A dog", "A horse", "A tabby cat", "A bird"], "C"),
    ("coffee.jpg", "object", "What is in the cup?", ["Orange juice", "Milk", "Water", "Coffee with foam"], "D"),
    ("rocket.jpg", "object", "What is shown in the image?",
     ["A sailing ship", "A rocket on a launch pad", "A lighthouse", "A bridge"], "B"),
    ("rocket.jpg", "scene", "What is the weather like?",
     ["Clear and blue sky", "Heavy snow", "A thunderstorm", "Thick fog"], "A"),
    ("coins.jpg", "spatial", "How are the objects arranged?",
     ["In a single stack", "Scattered randomly in a pile", "In rows on a flat surface", "In a circle"], "C"),
    ("hubble.jpg", "scene", "What does the image show?",
     ["A city at night", "Many distant galaxies", "A beach", "A field of flowers"], "B"),
    ("page.jpg", "text", "Is there text in the image?",
     ["No, it is a landscape", "No, it is blank", "Only numbers", "Yes, a page of printed text"], "D"),
]


def encode(path: Path) -> str:
    image = Image.open(path).convert("RGB")
    image.thumbnail((160, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    with open(HERE / "bench_tiny.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "image", "question", "A", "B", "C", "D", "answer", "category"])
        for index, (image, category, question, options, answer) in enumerate(QUESTIONS):
            writer.writerow([index, encode(HERE / "images" / image), question, *options, answer, category])


if __name__ == "__main__":
    main()
