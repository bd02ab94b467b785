"""The record reader: LLaVA JSON (a list, or JSON Lines ``*.jsonl``: one record per line) or the published
parquet -> validated records + the bad ones, with reasons. A JSONL line that is not JSON is a bad record
named by its line number.

A record is ``{"id", "image", "conversations"}``; ``image`` is a path relative to
the image folder, an absolute path, or a list of them; ``conversations``
alternate ``human``/``gpt`` starting with ``human``, and the first human turn
holds one ``<image>`` per image. Every record that breaks a rule becomes a
:class:`BadRecord` naming the record id and the reason; ``data.on_bad_record``
decides whether the first one stops the run or all are skipped, logged and
counted (they end up in the cache manifest). Nothing is dropped silently.

The published CoVT parquet (``precompute.parquet``) goes through the same rules: one
image per row, its bytes inside the file. ``data.subset`` keeps a seeded subset:
the records are walked in a permutation drawn from ``subset.seed`` and the first
``subset.size`` good ones are kept, in source order (bad records met on the walk
are reported as usual; records the walk does not reach are never decoded).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from covt.config import DataConfig, SubsetConfig
from covt.images import open_rgb
from precompute import parquet
from precompute.parquet import ParquetImage
from shards.samples import BadRecord, Record

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# the form of every special token of Qwen2.5-VL (<|im_start|>, <|image_pad|>, <|vision_start|>, ...) and of
# the visual thoughts (<|anchor_start|>, <|sam_pad|>, ...): literal in a text, the tokenizer reads it as
# that token, and the training text then holds an image or a thought the sample does not have
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
ROLES = ("human", "gpt")


class BadRecordError(ValueError):
    """A bad record while ``data.on_bad_record: error``."""

    def __init__(self, bad: BadRecord, data_path: str | Path = ""):
        where = f" in {data_path}" if data_path else ""
        super().__init__(
            f"bad record id={bad.id!r} (entry {bad.source_index}{where}): {bad.reason}"
            f"  [set data.on_bad_record=skip to skip and count bad records]"
        )
        self.bad = bad


class _Bad(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _image_paths(entry: dict, image_folder: Path) -> list[Path]:
    if "image" not in entry or entry["image"] in (None, "", []):
        raise _Bad("no_image", "record has no image")
    raw = entry["image"]
    names = raw if isinstance(raw, list) else [raw]
    paths = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise _Bad("bad_image_field", f"image entry {name!r} is not a file path")
        p = Path(name)
        paths.append(p if p.is_absolute() else image_folder / p)
    return paths


def _check_conversations(conversations: Any, num_images: int) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("no_conversations", "conversations is missing or not a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(key), str) for key in ("from", "value")):
            raise _Bad("bad_turn", f"turn {i} is not a mapping with string 'from' and 'value'")
        expected = ROLES[i % 2]
        if turn["from"] != expected:
            raise _Bad("role_order", f"turn {i} is from {turn['from']!r}, expected {expected!r} "
                                     "(turns alternate human/gpt, starting with human)")
        if not turn["value"].strip():
            raise _Bad("empty_turn", f"turn {i} ({turn['from']}) is empty")
        token = SPECIAL_TOKEN.search(turn["value"])
        if token:
            raise _Bad("special_token", f"turn {i} ({turn['from']}) holds the literal text {token.group()!r}, a "
                                        "special token of the model (the tokenizer would read it as an image or a "
                                        "visual thought, not as text)")
    if len(conversations) % 2:
        raise _Bad("role_order", "last turn is from 'human' with no 'gpt' answer")
    first = conversations[0]["value"].count(IMAGE_TOKEN)
    if first == 0:
        raise _Bad("no_image_token", f"first human turn has no {IMAGE_TOKEN}")
    later = [i for i, t in enumerate(conversations[1:], 1) if IMAGE_TOKEN in t["value"]]
    if later:
        raise _Bad("image_token_misplaced", f"{IMAGE_TOKEN} outside the first human turn (turn {later[0]})")
    if first != num_images:
        raise _Bad("image_count",
                   f"first human turn has {first} {IMAGE_TOKEN} but the record has {num_images} image(s)")
    return [{"from": t["from"], "value": t["value"]} for t in conversations]


def _check_image(path: Path | ParquetImage) -> None:
    """Raise :class:`_Bad` if the image at ``path`` is unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Bad("image_missing", f"image not found: {path}") from None
    except OSError as e:
        raise _Bad("image_unreadable", f"image unreadable: {path}: {e}") from None
    try:
        open_rgb(data)
    except Exception as e:  # PIL raises several types for broken/truncated files
        raise _Bad("image_unreadable", f"image cannot be decoded (missing, truncated or corrupt): {path}: "
                                       f"{type(e).__name__}: {e}") from None


@dataclass
class _Candidate:
    source_index: int
    id: str
    images: list[Path | ParquetImage] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)
    bad: BadRecord | None = None


@dataclass
class _BadLine:
    """A line of a JSONL file that is not JSON: a bad record named by its line number."""

    line: int
    error: str


def _jsonl_entries(path: Path) -> list:
    """The records of a JSON Lines file (one JSON object per line; blank lines ignored)."""
    entries: list = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                entries.append(_BadLine(line_number, e.msg))
    return entries


def _candidates(entries: list, image_folder: Path) -> Iterator[_Candidate]:
    seen: dict[str, int] = {}
    for source_index, entry in enumerate(entries):
        if isinstance(entry, _BadLine):
            rid = f"line {entry.line}"
            yield _Candidate(source_index, rid, bad=BadRecord(
                source_index, rid, f"line {entry.line} is not valid JSON: {entry.error}", "bad_json"))
            continue
        if not isinstance(entry, dict):
            yield _Candidate(source_index, str(source_index),
                             bad=BadRecord(source_index, str(source_index), "record is not a JSON object",
                                           "not_an_object"))
            continue
        rid = str(entry["id"]) if entry.get("id") not in (None, "") else str(source_index)
        cand = _Candidate(source_index, rid)
        try:
            _check_new_id(rid, source_index, seen)
            cand.images = _image_paths(entry, image_folder)
            cand.conversations = _check_conversations(entry.get("conversations"), len(cand.images))
        except _Bad as e:
            cand.bad = BadRecord(source_index, rid, e.reason, e.kind)
        yield cand


def _check_new_id(rid: str, source_index: int, seen: dict[str, int]) -> None:
    if rid in seen:
        raise _Bad("duplicate_id", f"duplicate id (first used by entry {seen[rid]})")
    seen[rid] = source_index


def _parquet_candidates(path: str) -> Iterator[_Candidate]:
    """The JSON rules for parquet rows: one image per row (its bytes are checked later, like a JSON file)."""
    seen: dict[str, int] = {}
    for row in parquet.rows(path):
        rid = row.id if row.id is not None else str(row.source_index)
        cand = _Candidate(row.source_index, rid, images=[row.image])
        try:
            _check_new_id(rid, row.source_index, seen)
            cand.conversations = _check_conversations(row.conversations, 1)
        except _Bad as e:
            cand.bad = BadRecord(row.source_index, rid, e.reason, e.kind)
        yield cand


def _with_image_checks(cands: Iterator[_Candidate], total: int) -> Iterator[_Candidate]:
    """Decode each candidate's images fully, in parallel threads, yielding in source order."""
    workers = max(1, min(8, os.cpu_count() or 1))

    def check(c: _Candidate) -> _Candidate:
        if c.bad is None:
            try:
                for p in c.images:
                    _check_image(p)
            except _Bad as e:
                c.bad = BadRecord(c.source_index, c.id, e.reason, e.kind)
        return c

    # a bounded window keeps memory flat and lets an error stop the run without decoding the rest
    window = 64 * workers
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, desc="checking records", unit="rec",
                                                  disable=total < 1000, leave=False) as bar:
        batch: list[_Candidate] = []
        for cand in cands:
            batch.append(cand)
            if len(batch) == window:
                yield from pool.map(check, batch)
                bar.update(len(batch))
                batch = []
        yield from pool.map(check, batch)
        bar.update(len(batch))


def _read_json(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"data.path: LLaVA JSON not found: {path}")
    if path.suffix.lower() == ".jsonl":
        entries = _jsonl_entries(path)
    else:
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if "Extra data" in e.msg else ""
            raise ValueError(f"data.path: {path} is not valid JSON: {e}{hint}") from None
    if not isinstance(entries, list):
        raise ValueError(f"data.path: {path} must hold a JSON list of records, got {type(entries).__name__}")
    return entries


def _read_candidates(data_cfg: DataConfig) -> list[_Candidate]:
    """Every record of ``data.path`` (up to ``data.limit``) with the checks that need no image decoding."""
    if parquet.is_parquet(data_cfg.path):
        rows = _parquet_candidates(data_cfg.path)
        return [c for _, c in zip(range(data_cfg.limit), rows)] if data_cfg.limit is not None else list(rows)
    entries = _read_json(Path(data_cfg.path))
    if data_cfg.limit is not None:
        entries = entries[: data_cfg.limit]
    return list(_candidates(entries, Path(data_cfg.image_folder)))


def _walk(cands: Sequence[_Candidate], subset: SubsetConfig) -> Iterator[_Candidate]:
    """Candidates with their images checked, in the order they are decided; with a subset, the seeded walk
    stops once ``subset.size`` are good. Each step checks the rest it needs in source order, so parquet
    row groups are read in order, then yields them in walk order (which decides what a bad one is replaced by)."""
    if subset.size is None:
        yield from _with_image_checks(iter(cands), len(cands))
        return
    order = np.random.default_rng(subset.seed).permutation(len(cands))
    need, pos = subset.size, 0
    while need > 0 and pos < len(order):
        step = order[pos:pos + need]
        pos += len(step)
        list(_with_image_checks(iter([cands[i] for i in np.sort(step)]), len(step)))  # fills in .bad
        for i in step:
            yield cands[i]
            need -= cands[i].bad is None


def load_records(data_cfg: DataConfig, check: Callable[[list[dict]], str | None] | None = None
                 ) -> tuple[list[Record], list[BadRecord]]:
    """Read and validate the records at ``data_cfg.path`` (JSON or parquet); see the module docstring.
    ``check(conversations)``: a further reason a record is bad (``too_long``: ``precompute.lengths``), or None."""
    cands = _read_candidates(data_cfg)
    good: list[_Candidate] = []
    bad: list[BadRecord] = []
    for cand in _walk(cands, data_cfg.subset):
        if cand.bad is None and check is not None and (reason := check(cand.conversations)):
            cand.bad = BadRecord(cand.source_index, cand.id, reason, "too_long")  # the walk replaces it
        if cand.bad is not None:
            if data_cfg.on_bad_record == "error":
                raise BadRecordError(cand.bad, data_cfg.path)
            log.warning("skipping bad record id=%r (entry %d): %s", cand.bad.id, cand.bad.source_index, cand.bad.reason)
            bad.append(cand.bad)
            continue
        good.append(cand)
    good.sort(key=lambda c: c.source_index)
    bad.sort(key=lambda b: b.source_index)
    records = [Record(i, c.source_index, c.id, c.images, c.conversations) for i, c in enumerate(good)]
    if bad:
        log.warning("%d of %d records skipped as bad (see the cache manifest's bad_records)", len(bad), len(cands))
    size = data_cfg.subset.size
    if size is not None and len(records) < size:
        log.warning("data.subset.size=%d but only %d of %d records are good: caching those", size, len(records),
                    len(cands))
    return records, bad


def split_validation(data_cfg: DataConfig, records: list[Record],
                     bad: list[BadRecord]) -> tuple[list[Record], list[Record], list[BadRecord]]:
    """(training records, validation records, the validation file's bad records) for ``data.validation``.

    A count N holds out the last N good records of ``data.path`` (never in the training cache); a path
    reads a LLaVA JSON of its own, with the same image folder and bad-record rule. Both lists are
    numbered from 0, as each is a cache of its own.
    """
    held = data_cfg.validation
    if held is None:
        return records, [], []
    if isinstance(held, str):
        val_records, val_bad = load_records(dataclasses.replace(data_cfg, path=held, limit=None, subset=SubsetConfig(),
                                                                   validation=None))
        return records, val_records, val_bad
    if not 0 < held < len(records):
        raise ValueError(f"data.validation={held}: must hold out between 1 and {len(records) - 1} of the "
                         f"{len(records)} good records of {data_cfg.path}")
    return records[:-held], [dataclasses.replace(r, index=i) for i, r in enumerate(records[-held:])], []
