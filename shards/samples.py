"""What the cache is written from: one good record per sample (its image files and conversation), and the
bad records the manifest counts. precompute's readers (``precompute.records``) produce them; the writer
stores them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ImageSource(Protocol):
    """An image file on disk (``pathlib.Path``) or inside a parquet row (``precompute.parquet.ParquetImage``)."""

    name: str
    suffix: str

    def read_bytes(self) -> bytes: ...


@dataclass
class Record:
    index: int  # position among the good records = sample index in the cache (0..N-1)
    source_index: int  # position in the JSON list
    id: str
    images: list[ImageSource]
    conversations: list[dict]


@dataclass
class BadRecord:
    source_index: int
    id: str
    reason: str
    kind: str = "other"  # short category, counted in the manifest
