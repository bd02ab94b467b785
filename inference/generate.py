"""Answer questions about images with a trained model, its visual thoughts shown as text.

``python -m trainer generate --model DIR --image IMG --question Q`` (or ``--questions FILE``,
a JSON list or JSONL of ``{"image": ..., "question": ...}``). Start reading at
:func:`generate_answers`: prompt (:func:`prompt_messages`, the processor's chat template with
the generation prompt, as VLMEvalKit's CoVT class builds it) -> ``model.generate`` (greedy by
default) -> :class:`Answer` (the text decoded as VLMEvalKit decodes it, the answer taken from
``<answer>...</answer>`` when present, and the chain of visual thoughts the model emitted).

The image goes to the processor at its own aspect ratio, its pixel count clamped to
[``min_pixels``, ``max_pixels``] (VLMEvalKit's CoVT entries: 1280x28x28 to 16384x28x28), or,
with ``image_size``, as the square view training used (``model.image_size``).

:func:`ablate_thoughts` (``--ablate-thoughts``) blanks what the visual thoughts carry, to test
whether answers depend on it; see its docstring for the fixed vector and why. ``--force-thoughts``
prefills the assistant turn with the opening every visual chain of stages 3-4 starts with
(:data:`THOUGHT_OPENING`), so the model must think visually before it answers; the prefill counts as
part of the answer's text. ``--prompt-layout training`` writes the prompt as training did instead of with
the chat template: the reference's layout has a newline before each ``<|im_end|>`` (trainer/formats.py),
which VLMEvalKit's chat-template prompt has not.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from covt.anchors import ANCHORS
from covt.images import square_view
from trainer.formats import ASSISTANT_HEADER, IMAGE_TEXT, SYSTEM_MESSAGE, turn
from trainer.loading import load_processor, load_vlm
from trainer.model import unwrap_vlm
from trainer.tokens import ThoughtTokens, thought_chain, thought_positions, thought_tokens

MIN_PIXELS = 1280 * 28 * 28  # VLMEvalKit's CoVT-7B-* entries (vlmeval/config.py)
MAX_PIXELS = 16384 * 28 * 28
ANSWER_TAG = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
# how every chain of stages 3-4 starts (trainer.formats.reasoning_answer): the prefill of --force-thoughts
THOUGHT_OPENING = "<think> Because the"


@dataclass
class ImageSizing:
    """How an image is handed to the processor (see the module docstring)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    image_size: int | None = None  # square view of this side instead of the pixel range

    def prepare(self, image: Image.Image) -> tuple[Image.Image, dict]:
        """(image for the processor, processor keyword arguments)."""
        image = image.convert("RGB")
        if self.image_size:
            return Image.fromarray(square_view(image, self.image_size)), {}
        return image, {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


@dataclass
class Answer:
    question: str
    image: str
    text: str  # decoded with skip_special_tokens=True, as VLMEvalKit reads it
    answer: str  # inside <answer>...</answer> if present, else the stripped text
    chain: str  # the generated text with every visual thought shown as [anchor x N]
    thoughts: list[str] = field(default_factory=list)  # anchors of the complete visual thoughts, in order
    thought_spans: list[tuple[str, list[int]]] = field(default_factory=list)  # (anchor, sequence positions)
    pads_written: int = 0  # visual thought pads among the generated tokens, in complete thoughts or not

    def to_dict(self) -> dict:
        return {"image": self.image, "question": self.question, "answer": self.answer, "text": self.text,
                "chain": self.chain, "thoughts": self.thoughts}


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto"):
    """(vlm in eval mode, processor) of a Hugging Face Qwen2.5-VL folder (final/, a merged run, a base model)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: not a model folder (no config.json); "
                                "give a trained model such as runs/tiny/train/final")
    processor = load_processor(folder)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return load_vlm(folder, dtype=dtype, device=device).eval(), processor


def model_thought_tokens(processor) -> ThoughtTokens | None:
    """The thought tokens of the model's tokenizer, or None (a base model never trained with them)."""
    try:
        return thought_tokens(processor.tokenizer)
    except KeyError:
        return None


def prompt_messages(question: str, system_prompt: str | None = None) -> list[dict]:
    """One user turn: the image, then the question (VLMEvalKit's order for single-image prompts)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return messages


PROMPT_LAYOUTS = ("chat_template", "training")


def training_prompt(question: str, system_prompt: str | None = None) -> str:
    """The prompt as the stage formats write it (trainer.formats): the image first, a newline before each
    ``<|im_end|>``."""
    return turn("system", system_prompt or SYSTEM_MESSAGE) + turn("user", IMAGE_TEXT + question) + ASSISTANT_HEADER


def prompt_text(processor, question: str, system_prompt: str | None = None, layout: str = "chat_template") -> str:
    """The prompt of one question up to the assistant's turn, in ``layout`` (one of :data:`PROMPT_LAYOUTS`)."""
    if layout == "training":
        return training_prompt(question, system_prompt)
    if layout != "chat_template":
        raise ValueError(f"prompt layout {layout!r}: expected one of {PROMPT_LAYOUTS}")
    return processor.apply_chat_template(prompt_messages(question, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(processor, images: list[Image.Image], questions: list[str], sizing: ImageSizing,
                   system_prompt: str | None = None, prefill: str = "",
                   layout: str = "chat_template") -> dict[str, torch.Tensor]:
    """Left-padded model inputs for a batch of (image, question), the assistant turn started with ``prefill``."""
    texts, prepared, kwargs = [], [], {}
    for image, question in zip(images, questions):
        texts.append(prompt_text(processor, question, system_prompt, layout) + prefill)
        view, kwargs = sizing.prepare(image)
        prepared.append(view)
    return dict(processor(text=texts, images=prepared, padding=True, return_tensors="pt", **kwargs))


def extract_answer(text: str) -> str:
    """VLMEvalKit's CoVT rule: the inside of <answer>...</answer> when present, else the whole text, stripped."""
    match = ANSWER_TAG.search(text)
    return (match.group(1) if match else text).strip()


class ThoughtSpanCompleter:
    """A logits processor that finishes a visual thought once its first pad is out: the anchor's remaining
    pads, then ``<|anchor_end|>``. Used with :func:`ablate_thoughts`, whose blanked states at the pad positions
    would otherwise also decide the next pads, so the ablation would change the chain's form, not only its
    content."""

    def __init__(self, tokens: ThoughtTokens):
        self.tokens = tokens

    def forced(self, ids: list[int]) -> int | None:
        if not ids or ids[-1] not in self.tokens.anchor_of:
            return None
        anchor = self.tokens.anchor_of[ids[-1]]
        run = 0
        while run < len(ids) and ids[-1 - run] == self.tokens.pad_id[anchor]:
            run += 1
        if run >= len(ids) or ids[-1 - run] != self.tokens.start_id:
            return None
        return self.tokens.pad_id[anchor] if run < ANCHORS[anchor].tokens else self.tokens.end_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids.tolist()):
            token = self.forced(ids)
            if token is not None:
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, token] = 0.0
        return scores


@contextmanager
def ablate_thoughts(vlm, tokens: ThoughtTokens) -> Iterator[None]:
    """While open, every decoder layer's output at visual-thought pad positions is replaced by a fixed vector:
    that pad token's own input embedding.

    Why this vector: later tokens read a visual thought only through the states at its positions, layer by
    layer. The input embedding of ``<|a_pad|>`` is what those positions hold before any layer has looked at
    the image, so it is the same for every image and question, and of the scale the layers expect (a zero
    vector would be a state the model never saw). With it, an answer can still see *that* a thought of
    anchor ``a`` was emitted, but nothing of what the thought computed from the image. The prompt and
    the rest of the answer are untouched.
    """
    base = unwrap_vlm(vlm)
    language_model = base.model.language_model
    pad_ids = torch.tensor(list(tokens.pad_id.values()))
    state: dict[str, torch.Tensor] = {}

    def on_embed(_module, args, output):
        ids = args[0]
        state["mask"] = torch.isin(ids, pad_ids.to(ids.device)).unsqueeze(-1)
        state["embeds"] = output

    def on_layer(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state.get("mask")
        if mask is None or hidden.shape[:2] != mask.shape[:2] or not mask.any():
            return None
        blanked = torch.where(mask, state["embeds"].to(hidden.dtype), hidden)
        return (blanked, *output[1:]) if isinstance(output, tuple) else blanked

    handles = [language_model.embed_tokens.register_forward_hook(on_embed)]
    handles += [layer.register_forward_hook(on_layer) for layer in language_model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Generated:
    answers: list[Answer]
    sequences: torch.Tensor  # (B, prompt + new) token ids, prompts left-padded
    inputs: dict[str, torch.Tensor]  # the prompts' model inputs (pixel values etc.)

    def row(self, i: int) -> Generated:
        """Row ``i`` as a batch of one: its prompt's left padding removed (its thought positions shifted with it)
        and its own image's pixel values, so what reads row 0 (:mod:`inference.thoughts`) reads this row."""
        pad = int((self.inputs["attention_mask"][i].cumsum(0) == 0).sum())
        grids = self.inputs.get("image_grid_thw")
        inputs = {}
        for key, value in self.inputs.items():
            if key == "pixel_values":  # each row has one image: its patches are the i-th run of rows
                patches = grids.prod(-1).cumsum(0).tolist()
                value = value[(patches[i - 1] if i else 0):patches[i]]
            elif key == "image_grid_thw":
                value = value[i:i + 1]
            elif value.dim() >= 2 and value.shape[0] == len(self.answers):
                value = value[i:i + 1, pad:]
            inputs[key] = value
        answer = self.answers[i]
        spans = [(anchor, [p - pad for p in positions]) for anchor, positions in answer.thought_spans]
        return Generated([replace(answer, thought_spans=spans)], self.sequences[i:i + 1, pad:], inputs)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    sample: bool = False  # greedy unless asked (VLMEvalKit's top_k=1 is greedy too)
    temperature: float = 1.0
    ablate: bool = False
    force_thoughts: bool = False  # prefill the answer with THOUGHT_OPENING
    prompt_layout: str = "chat_template"  # or "training": the stage formats' layout (PROMPT_LAYOUTS)

    @property
    def prefill(self) -> str:
        return THOUGHT_OPENING if self.force_thoughts else ""


@torch.no_grad()
def generate_answers(vlm, processor, images: list[Image.Image], questions: list[str], sizing: ImageSizing,
                     settings: GenerationSettings, names: list[str] | None = None,
                     system_prompt: str | None = None) -> Generated:
    """Generate one answer per (image, question), all in one batch."""
    tokens = model_thought_tokens(processor)
    if (settings.ablate or settings.force_thoughts) and tokens is None:
        raise ValueError("--ablate-thoughts and --force-thoughts need a model with visual thought tokens; this "
                         "tokenizer has none")
    inputs = {k: v.to(vlm.device) for k, v in encode_prompts(processor, images, questions, sizing, system_prompt,
                                                              settings.prefill, settings.prompt_layout).items()}
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
                  pad_token_id=processor.tokenizer.pad_token_id)
    if settings.sample:
        kwargs["temperature"] = settings.temperature
    else:  # the folder's generation_config may carry sampling defaults; greedy means none of them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.ablate:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([ThoughtSpanCompleter(tokens)])
    with ablate_thoughts(vlm, tokens) if settings.ablate else nullcontext():
        sequences = vlm.generate(**inputs, **kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    answers = []
    for row, question in enumerate(questions):
        generated = sequences[row, prompt_length:].tolist()
        decode = processor.tokenizer.decode
        text = settings.prefill + decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        chain, anchors = thought_chain(settings.prefill + decode(generated, skip_special_tokens=False))
        spans = thought_positions(generated, tokens, offset=prompt_length) if tokens else []
        answers.append(Answer(question=question, image=names[row] if names else "", text=text,
                              answer=extract_answer(text), chain=chain, thoughts=anchors, thought_spans=spans,
                              pads_written=sum(t in tokens.anchor_of for t in generated) if tokens else 0))
    return Generated(answers, sequences, inputs)


# ----------------------------------------------------------------------------- questions in
def read_questions(path: str | Path) -> list[dict]:
    """A JSON list or JSONL of ``{"image": path, "question": text}``; relative images are resolved beside the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--questions {path}: file not found")
    text = path.read_text()
    try:
        items = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                  if line.strip()]
    except json.JSONDecodeError as e:
        kind = "JSON" if path.suffix == ".json" else "JSON lines"
        raise ValueError(f"--questions {path}: not valid {kind}: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"--questions {path}: expected a JSON list of objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        missing = [k for k in ("image", "question") if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"--questions {path}: entry {i} lacks {missing} (each needs 'image' and 'question')")
        image = Path(item["image"])
        item["image"] = str(image if image.is_absolute() else path.parent / image)
    return items


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return Image.open(path).convert("RGB")


def format_answer(answer: Answer) -> str:
    """What the CLI prints for one answer."""
    lines = [f"image:    {answer.image}", f"question: {answer.question}"]
    thoughts = ", ".join(f"{a} ({ANCHORS[a].tokens} tokens)" for a in answer.thoughts) or "none"
    lines += [f"visual thoughts: {thoughts}", f"chain:    {answer.chain}", f"answer:   {answer.answer}"]
    return "\n".join(line.replace("\n", "\n" + " " * 10) for line in lines)  # a multi-line answer stays indented


# ----------------------------------------------------------------------------- cli
def add_generation_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Options generate and evaluate share."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS, help="image pixels at least (VLMEvalKit's CoVT)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="image pixels at most (VLMEvalKit's CoVT)")
    p.add_argument("--image-size", type=int, default=None,
                   help="feed the square view of this side instead (what training used: model.image_size)")
    p.add_argument("--force-thoughts", action="store_true",
                   help=f"start every answer with {THOUGHT_OPENING!r}, so the model must think visually")
    p.add_argument("--prompt-layout", choices=PROMPT_LAYOUTS, default="chat_template",
                   help="chat_template: as VLMEvalKit prompts; training: as the stage formats wrote prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def sizing_from_args(a) -> ImageSizing:
    return ImageSizing(min_pixels=a.min_pixels, max_pixels=a.max_pixels, image_size=a.image_size)


def settings_from_args(a) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=a.max_new_tokens, sample=a.sample, temperature=a.temperature,
                              force_thoughts=a.force_thoughts, prompt_layout=a.prompt_layout)
