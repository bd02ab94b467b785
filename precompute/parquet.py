"""The CoVT dataset as published: parquet files read row group by row group, no conversion step.

Schema (Wakals/CoVT-Dataset): ``id`` (string), ``image`` (struct of ``bytes`` and
``path``), ``image_relpath`` (string), ``conversations`` (list of ``{from, value}``).
``data.path`` names one file, a glob, or a folder of ``*.parquet`` files (read in
sorted order; a record's ``source_index`` is its row position across them).

Reading is two-phase so memory stays at one row group, never a whole ~20 GB file:
:func:`rows` yields each row's id, conversations and an :class:`ParquetImage`
reference (the image column is not read); ``ParquetImage.read_bytes`` later reads
the image column of that row's row group, keeping the last few row groups, so
walking records in source order reads each row group once. The bytes are the
original encoded image, written to the tars unchanged.
"""
from __future__ import annotations

import glob
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

COLUMNS = ("id", "image", "image_relpath", "conversations")
META_COLUMNS = ("id", "image_relpath", "conversations")  # all but the image bytes
SCHEMA_HINT = "the published CoVT schema: id, image {bytes, path}, image_relpath, conversations [{from, value}]"


class ParquetSchemaError(ValueError):
    """A parquet file that does not have the published CoVT schema."""


def is_parquet(path: str) -> bool:
    """True if ``data.path`` names parquet input (a ``.parquet`` file or glob, or a folder of them)."""
    p = Path(path)
    if p.is_dir():
        return True
    return path.endswith(".parquet") or (glob.has_magic(path) and ".parquet" in path)


def parquet_files(path: str) -> list[Path]:
    """The parquet files ``data.path`` names, sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
    elif glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(path))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"data.path: no parquet files at {path} (a .parquet file, a glob, or a folder of them)")
    return files


def _open(file: Path):
    import pyarrow.parquet as pq  # pyarrow is only needed for parquet input

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise ParquetSchemaError(f"data.path: {file} is not a readable parquet file: {e}") from None


def check_schema(file: Path, pf) -> None:
    """Every column of the published schema, and ``image`` a struct with ``bytes``; else a clear error."""
    import pyarrow as pa

    schema = pf.schema_arrow
    for col in COLUMNS:
        if col not in schema.names:
            raise ParquetSchemaError(f"data.path: {file} has no column {col!r} (has {schema.names}; {SCHEMA_HINT})")
    image = schema.field("image").type
    if not pa.types.is_struct(image) or image.get_field_index("bytes") < 0:
        raise ParquetSchemaError(f"data.path: {file}: column 'image' is {image}, expected a struct with a "
                                 f"'bytes' field ({SCHEMA_HINT})")
    found = {"image.bytes": image.field(image.get_field_index("bytes")).type,
             "image_relpath": schema.field("image_relpath").type,
             "conversations": schema.field("conversations").type}
    for column, (expected, accepts) in _column_types().items():
        if not accepts(found[column]):
            raise ParquetSchemaError(f"data.path: {file}: column {column!r} is {found[column]}, expected {expected} "
                                     f"({SCHEMA_HINT})")


def _column_types() -> dict:
    import pyarrow as pa

    t = pa.types
    return {"image.bytes": ("binary", lambda x: t.is_binary(x) or t.is_large_binary(x)),
            "image_relpath": ("string", lambda x: t.is_string(x) or t.is_large_string(x) or t.is_null(x)),
            "conversations": ("a list of {from, value}", lambda x: t.is_list(x) or t.is_large_list(x))}


@dataclass(frozen=True)
class ParquetImage:
    """One row's image inside a parquet file; quacks like the ``Path`` a JSON record holds."""

    file: Path
    row_group: int
    row: int  # within the row group
    relpath: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name if self.relpath else f"row{self.row}.bin"

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def read_bytes(self) -> bytes:
        data = ROW_GROUPS.image_bytes(self.file, self.row_group, self.row)
        if data is None:  # the same kind of failure as a JSON record's missing file
            raise FileNotFoundError(f"{self} has no image bytes")
        return data

    def __str__(self) -> str:
        return f"{self.file} row group {self.row_group} row {self.row} ({self.relpath or 'no image_relpath'})"


class RowGroupImages:
    """The image columns of the last ``keep`` row groups read, shared by threads of one process."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._files: dict[str, object] = {}

    def image_bytes(self, file: Path, row_group: int, row: int) -> bytes | None:
        key = (str(file), row_group)
        with self._lock:  # one reader at a time: the row group is read once, not by every waiting thread
            column = self._groups.get(key)
            if column is None:
                pf = self._files.get(key[0])
                if pf is None:
                    pf = self._files[key[0]] = _open(file)
                column = pf.read_row_group(row_group, columns=["image"]).column("image").combine_chunks()
                column = column.field("bytes")
                self._groups[key] = column
                while len(self._groups) > self.keep:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(key)
        value = column[row]
        return value.as_py() if value.is_valid else None


ROW_GROUPS = RowGroupImages()


@dataclass
class Row:
    source_index: int
    id: str | None
    image: ParquetImage
    conversations: object  # as stored; the records module validates it


def rows(path: str) -> Iterator[Row]:
    """Every row of the parquet files at ``path`` without its image bytes, in source order."""
    source_index = 0
    for file in parquet_files(path):
        pf = _open(file)
        check_schema(file, pf)
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=list(META_COLUMNS))
            ids, relpaths, convs = (table.column(c).to_pylist() for c in META_COLUMNS)
            for row, (rid, relpath, conv) in enumerate(zip(ids, relpaths, convs)):
                image = ParquetImage(file, rg, row, relpath or "")
                yield Row(source_index, None if rid in (None, "") else str(rid), image, conv)
                source_index += 1


def num_rows(path: str) -> int:
    return sum(_open(f).metadata.num_rows for f in parquet_files(path))
