"""Raw cache samples -> model tensors for one optimizer step's stage.

:class:`BatchBuilder`, the DataLoader's ``collate_fn``, runs in the loader's workers and calls
:func:`build_batch` with the stage of the samples' optimizer step, so a sample's format depends
only on (stage, train.seed, global step, sample index), not on the micro-batch it lands in.

Per sample: the stage's training text (trainer.formats: prompt + labelled part, the
reference's texts), the processor on the prompt with the square view of image 0 at
``model.image_size`` (the view the anchors saw), labels on the labelled part only,
truncation to ``train.max_length`` that never splits the image or a visual thought.
Per anchor: which rows carry its thoughts, where its pad tokens are, the stacked cached
targets of those rows and, for heads that ask, uint8 views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from covt.anchors import get_anchor
from covt.images import square_view
from trainer.formats import FormatError, TrainingText, format_sample, plain_text, sample_rng
from trainer.heads.base import head_views
from trainer.host_inputs import (
    VisionGeometry,
    image_feature_count,
    image_token_index,
    packed_position_ids,
    packed_text_boundaries,
    padded_position_ids,
    vision_inputs,
)
from trainer.settings import BatchSettings
from trainer.tokens import ThoughtTokens, spans

IGNORE_INDEX = -100


class BatchError(ValueError):
    """A sample that cannot become training tensors (names the sample and the reason)."""


def _name(sample: dict) -> str:
    return f"sample {sample.get('index')} (key {sample.get('key')!r}, id {sample.get('id')!r})"


def sample_text(sample: dict, stage_name: str, anchors: list[str], step: int,
                settings: BatchSettings) -> TrainingText:
    """The training text of ``sample`` in ``stage_name``'s format at global optimizer ``step``."""
    # per_step: the samples of one optimizer step share one draw (the reference: 8 GPUs x 1 sample, python
    # random seeded 42 on every rank)
    rng = sample_rng(settings.seed, step, sample["index"] if settings.stage4_draws == "per_sample" else None)
    try:
        if settings.plain_only:
            # the direct fine-tune control: every stage trains stage 4's plain answer (no thoughts), so the
            # control sees the same questions, answers and text layout as CoVT, only without visual thoughts
            return plain_text(sample["conversations"])
        return format_sample(sample["conversations"], stage_name, anchors, rng, settings.plain_answer_fraction)
    except FormatError as e:
        raise BatchError(f"{_name(sample)}: {e}") from None


def encode_text(text: TrainingText, view: Image.Image, processor) -> dict[str, torch.Tensor]:
    """input_ids, labels (and the processor's other per-token rows) of one sample, 1-D, not truncated.

    As the reference does, the prompt goes through the processor with the image (which
    expands ``<|image_pad|>``) and the labelled part through the tokenizer alone; the two
    are concatenated, and only the labelled part carries labels.
    """
    enc = processor(text=[text.prompt], images=[view], return_tensors="pt")
    answer = processor.tokenizer(text.labelled, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    prompt_ids = enc["input_ids"][0]
    row = {
        "input_ids": torch.cat([prompt_ids, answer]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer]),
        "attention_mask": torch.ones(prompt_ids.numel() + answer.numel(), dtype=enc["attention_mask"].dtype),
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
    }
    if "mm_token_type_ids" in enc:  # 0 = text: the labelled part has no image
        types = enc["mm_token_type_ids"][0]
        row["mm_token_type_ids"] = torch.cat([types, torch.zeros(answer.numel(), dtype=types.dtype)])
    return row


def truncation_point(ids: list[int], max_length: int | None, processor, tokens: ThoughtTokens, where: str) -> int:
    """Largest length <= max_length that splits neither the image nor a visual thought (None: no limit)."""
    if max_length is None or len(ids) <= max_length:
        return len(ids)
    tok = processor.tokenizer
    vision = spans(ids, tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>"))
    for begin, end in vision:
        if begin < max_length <= end:
            raise BatchError(f"{where}: train.max_length={max_length} would cut through the image "
                             f"(tokens {begin}..{end} of {len(ids)}); raise train.max_length")
        if begin >= max_length:
            raise BatchError(f"{where}: train.max_length={max_length} leaves out the image "
                             f"(it starts at token {begin} of {len(ids)}); raise train.max_length")
    cut = max_length
    for begin, end in spans(ids, tokens.start_id, tokens.end_id):
        if begin < cut <= end:
            cut = begin  # drop the whole thought rather than train on half of one
    return cut


def _encode(sample: dict, stage_name: str, anchors: list[str], step: int, processor, tokens: ThoughtTokens,
            settings: BatchSettings):
    where = _name(sample)
    if not sample.get("images"):
        raise BatchError(f"{where}: no image")
    text = sample_text(sample, stage_name, anchors, step, settings)
    view = Image.fromarray(square_view(sample["images"][0], settings.image_size))
    enc = encode_text(text, view, processor)
    labels = enc["labels"]
    cut = truncation_point(enc["input_ids"].tolist(), settings.max_length, processor, tokens, where)
    if not (labels[:cut] != IGNORE_INDEX).any():
        raise BatchError(f"{where}: train.max_length={settings.max_length} leaves no answer token to train on "
                         f"(the sequence has {labels.numel()} tokens); raise train.max_length")
    row = {k: enc[k][:cut] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels") if k in enc}
    return row, enc["pixel_values"], enc["image_grid_thw"]


def _pad(rows: list[torch.Tensor], value: int, multiple: int = 1) -> torch.Tensor:
    out = torch.full((len(rows), padded_size(max(r.numel() for r in rows), multiple)), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r
    return out


def _anchor_part(anchor: str, samples: list[dict], input_ids: torch.Tensor, tokens: ThoughtTokens,
                 view_size: int | None, every_row: bool = False) -> dict[str, Any]:
    """The rows that carry ``anchor``'s thoughts, their pad positions, targets and views; with ``every_row`` all
    rows, and ``carries`` (1.0 where a row carries them; the others point at their first positions and add no
    loss)."""
    n = get_anchor(anchor).tokens
    is_pad = input_ids == tokens.pad_id[anchor]
    rows, positions, carries = [], [], []
    for r in range(input_ids.shape[0]):
        pos = is_pad[r].nonzero().flatten()
        if pos.numel() not in (0, n):
            raise BatchError(f"{_name(samples[r])}: {pos.numel()} <|{anchor}_pad|> tokens, expected 0 or {n}")
        if pos.numel() or every_row:
            rows.append(r)
            positions.append(pos if pos.numel() else torch.arange(n))
            carries.append(float(pos.numel() > 0))
    for s in samples:
        if anchor not in s.get("targets", {}):
            raise BatchError(f"{_name(s)}: the cache has no targets for anchor {anchor!r} "
                             f"(has {sorted(s.get('targets', {}))})")
    first = samples[0]["targets"][anchor]
    targets = {name: torch.stack([samples[r]["targets"][anchor][name] for r in rows]) if rows
               else first[name].unsqueeze(0)[:0] for name in first}
    views = head_views([samples[r]["images"][0] for r in rows], view_size) if view_size else None
    part = {
        "rows": torch.tensor(rows, dtype=torch.long),
        "positions": torch.stack(positions) if positions else torch.zeros((0, n), dtype=torch.long),
        "targets": targets,
        "views": views,
    }
    return {**part, "carries": torch.tensor(carries)} if every_row else part


def build_batch(samples: list[dict], stage, anchors_on: bool, step: int, processor, tokens: ThoughtTokens,
                settings: BatchSettings, view_sizes: dict[str, int | None] | None = None,
                vision: VisionGeometry | None = None) -> dict[str, Any]:
    """Model tensors for ``samples`` in ``stage``'s format (a covt.config.StageConfig) at global ``step``.

    Returns input_ids, attention_mask, labels, pixel_values, image_grid_thw (and mm_token_type_ids and the
    rope position_ids when the processor gives the token types), right-padded, and with ``vision`` (the model's
    CoVTModel.vision_geometry) the vision tower's index tensors (trainer.host_inputs); ``anchors``:
    {anchor: {rows, positions (B_a, tokens), targets {array: (B_a, ...)}, views (B_a,3,S,S) uint8 or None}}
    for every active anchor when ``anchors_on`` (rows may be empty), else {}; ``text``: :func:`text_targets`;
    ``keys``. With ``settings.packing`` the samples are one row instead (:func:`pack`).
    """
    encoded = encode_samples(samples, stage, step, processor, tokens, settings)
    return _assemble(samples, encoded, anchors_on, processor, tokens, settings, view_sizes, vision)


def encode_samples(samples: list[dict], stage, step: int, processor, tokens: ThoughtTokens,
                   settings: BatchSettings) -> list[tuple]:
    """Each sample's training text and view through the processor: (token rows, pixel values, grid)."""
    if not samples:
        raise BatchError("empty batch")
    return [_encode(s, stage.name, list(settings.anchors), step, processor, tokens, settings) for s in samples]


def cut_by_length(encoded: list[tuple], micro_batches: int) -> list[list[int]]:
    """The indices of each of ``micro_batches`` micro-batches of one optimizer step's samples
    (train.sort_step_by_length): the samples by token count, longest first, so that each micro-batch pads to a
    length near its own samples'. The same samples make the step, so its loss (the mean over them) is unchanged."""
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i][0]["input_ids"].numel())  # stable: ties in order
    size = -(-len(order) // micro_batches)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _assemble(samples: list[dict], encoded: list[tuple], anchors_on: bool, processor, tokens: ThoughtTokens,
              settings: BatchSettings, view_sizes: dict[str, int | None] | None,
              vision: VisionGeometry | None) -> dict[str, Any]:
    """:func:`build_batch`'s micro-batch from its samples' :func:`_encode` results."""
    anchors = list(settings.anchors)
    rows = [e[0] for e in encoded]
    pad_id = processor.tokenizer.pad_token_id
    batch: dict[str, Any] = {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id, settings.pad_to_multiple_of),
        "attention_mask": _pad([r["attention_mask"] for r in rows], 0, settings.pad_to_multiple_of),
        "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, settings.pad_to_multiple_of),
        "pixel_values": torch.cat([e[1] for e in encoded]),
        "image_grid_thw": torch.cat([e[2] for e in encoded]),
    }
    if "mm_token_type_ids" in rows[0]:
        batch["mm_token_type_ids"] = _pad([r["mm_token_type_ids"] for r in rows], 0, settings.pad_to_multiple_of)
        batch["position_ids"] = padded_position_ids(batch, processor.image_processor.merge_size)
        batch["image_token_index"] = image_token_index(batch["mm_token_type_ids"])
        batch["has_padding"] = not bool(batch["attention_mask"].all())
        features = image_feature_count(batch["image_grid_thw"], processor.image_processor.merge_size)
        if batch["image_token_index"].numel() != features:
            raise BatchError(f"{[_name(s) for s in samples]}: {batch['image_token_index'].numel()} image tokens for "
                             f"{features} image features")
    if vision is not None:
        batch.update(vision_inputs(batch["image_grid_thw"], vision))
    batch["text"] = text_targets(batch["labels"], settings.pad_to_multiple_of)
    view_sizes = view_sizes or {}
    batch["anchors"] = ({a: _anchor_part(a, samples, batch["input_ids"], tokens, view_sizes.get(a),
                                         settings.every_anchor_row) for a in anchors} if anchors_on else {})
    batch["keys"] = [s.get("key") for s in samples]
    return pack(batch) if settings.packing else batch


def pack(batch: dict[str, Any]) -> dict[str, Any]:
    """A right-padded :func:`build_batch` batch as ONE row (train.packing): each sample's tokens in turn, no
    padding. The text targets and every anchor's thought positions point at the same tokens as before (row 0,
    the sample's offset + its position), with the same weights; position_ids give every sample its own rope
    positions and attention that stays within it (trainer.host_inputs); ``packed``: each sample's ``lengths``.
    The loss stays the mean over samples (:func:`sample_count`)."""
    if "mm_token_type_ids" not in batch:
        raise BatchError("train.packing needs the processor's mm_token_type_ids (which tokens are image tokens) to "
                         "give each sample its own rope positions; this processor gives none: set train.packing "
                         "to false")
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(1)
    offsets = lengths.cumsum(0) - lengths
    packed = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        packed[key] = batch[key][keep][None]
    packed["position_ids"] = packed_position_ids(batch["position_ids"], keep)
    packed.update(packed_text_boundaries(lengths))
    packed["image_token_index"] = image_token_index(packed["mm_token_type_ids"])
    packed["has_padding"] = False
    text = batch["text"]
    packed["text"] = {**text, "rows": torch.zeros_like(text["rows"]),
                      "positions": offsets[text["rows"]] + text["positions"]}
    packed["anchors"] = {anchor: {**part, "rows": torch.zeros_like(part["rows"]),
                                  "positions": offsets[part["rows"]][:, None] + part["positions"]}
                         for anchor, part in batch["anchors"].items()}
    packed["packed"] = {"lengths": lengths}
    return packed


def sample_count(batch: dict[str, Any]) -> int:
    """The number of samples in a :func:`build_batch` batch: its rows, or the samples packed into its one row."""
    return len(batch["packed"]["lengths"]) if "packed" in batch else batch["input_ids"].shape[0]


@dataclass
class BatchBuilder:
    """The training DataLoader's ``collate_fn``: one micro-batch of raw samples -> model tensors; with
    ``micro_batches`` (train.sort_step_by_length), one optimizer step's samples -> a list of that many
    micro-batches (:func:`cut_by_length`).

    It runs in the loader's worker processes, so tokenising, image processing and stacking targets overlap
    with the GPU's work. The optimizer step of a micro-batch follows from its samples' positions in the
    rank's stream (the stream of a run starts at ``step x samples_per_step``), and the stage from the step.
    """

    schedule: Any  # trainer.schedule.Schedule
    samples_per_step: int  # per rank: train.batch_size x train.grad_accum
    processor: Any
    tokens: ThoughtTokens
    settings: BatchSettings
    view_sizes: dict[str, int | None]
    first_step: int = 0  # the optimizer step at the stream's position 0 (train.data_order)
    vision: VisionGeometry | None = None  # the model's (CoVTModel.vision_geometry): its index tensors made here
    micro_batches: int | None = None  # set: each call gets a whole step's samples and cuts them by length

    def __call__(self, samples: list[dict]) -> dict[str, Any] | list[dict[str, Any]]:
        step = self.first_step + samples[0]["position"] // self.samples_per_step
        at = self.schedule.stage_at(step)
        encoded = encode_samples(samples, at.stage, step, self.processor, self.tokens, self.settings)
        cuts = [list(range(len(samples)))] if self.micro_batches is None else cut_by_length(encoded, self.micro_batches)
        batches = []
        for cut in cuts:
            part = [samples[i] for i in cut]
            batch = _assemble(part, [encoded[i] for i in cut], at.anchor_losses_on, self.processor, self.tokens,
                              self.settings, self.view_sizes, self.vision)
            batch["step"] = step
            batch["damaged_skipped"] = [problem for s in part for problem in s.get("damaged_skipped", ())]
            batches.append(batch)
        return batches[0] if self.micro_batches is None else batches


def text_targets(labels: torch.Tensor, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Where the text loss is read, computed on the host so the model needs no device sync to find it.

    The hidden state at ``(rows[i], positions[i])`` predicts token ``targets[i]``; ``weights[i]`` is one over
    the number of labelled tokens of its sample, so that ``sum(weights * token losses)`` is the sum over
    samples of each sample's mean token loss (the reference's loss at one sample per device). ``multiple``
    (train.pad_to_multiple_of): as many entries as the next multiple, the added ones weighing 0 (row 0,
    position 0, token 0), so the loss and gradients are unchanged.
    """
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=labels.shape[0]).clamp(min=1)
    text = {"rows": rows, "positions": positions, "targets": labels[rows, positions + 1],
            "weights": 1.0 / counts[rows].to(torch.float32)}
    extra = padded_size(len(rows), multiple) - len(rows)
    return {name: torch.cat([value, value.new_zeros(extra)]) for name, value in text.items()} if extra else text


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def map_tensors(batch: Any, fn) -> Any:
    """``batch`` (tensors in dicts, lists and tuples) with ``fn`` applied to every tensor."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (dtypes unchanged: the VLM casts pixel values itself)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def pinned(batch: Any) -> Any:
    """``batch`` in page-locked host memory, as the trainer's DataLoader (``pin_memory``) hands it over: its copy
    to the GPU is then asynchronous."""
    return map_tensors(batch, lambda t: t.pin_memory())
