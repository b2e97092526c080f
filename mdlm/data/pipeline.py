"""Prepare a corpus for training on Ray Data: read -> documents -> split -> tokenize -> pack -> parquet.

    manifest = prepare_dataset(config.data)      # or: python pipelines/prepare_data.py [a.b=value ...]

One streaming Ray Data execution, with ``preserve_order`` on, so the output rows are the same whatever the
number of workers:

1. read: ``read_binary_files`` (one row per file; local paths, globs, ``file://``, ``s3://``, ``gs://`` ...),
   fused with a task stage that decodes, cuts text files at blank lines (``split_text``), parses jsonl and
   parquet rows, and assigns every document to train / validation / test by its key ``relative/path:index``
   (``assign_split``, seeded). A Hugging Face dataset (``hf:NAME[:CONFIG]``) enters as Arrow slices instead.
2. tokenize: ``map_batches`` with a class on an ``ActorPoolStrategy`` pool; the tokenizer is loaded once per
   actor and runs single-threaded (the pool is the parallelism); fractional CPUs leave room for the reader.
   ``pad`` packing happens here (it is per document).
3. on the driver, in stream order: ``wrap`` packing with one carried remainder per split
   (:class:`~mdlm.data.packing.ArrayWrapPacker`) and fixed-size parquet files per split (``input_ids``
   list<int32>, ``attention_mask`` list<int8> in pad mode), written into a temporary sibling directory that
   is renamed into place at the end, so a failure never leaves half a dataset.

The driver writes because the wrap packer has to see the whole stream in order in one place anyway (it is
a single sequential stage), and the atomic rename needs one filesystem the driver controls. Input errors
found inside Ray tasks (undecodable bytes, a missing jsonl field ...) travel as rows with an ``error``
column and are raised on the driver as :class:`~mdlm.data.sources.DataError` with their message intact.

``tokenizer=bpe`` is trained first, by a pass over the training documents only. A rerun with the same
inputs (config, source file names, sizes and times, tokenizer, format version: the fingerprint) returns the
existing dataset unless ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import posixpath
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from mdlm.config import DataConfig
from mdlm.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ManifestError,
    SplitInfo,
    load_manifest,
)
from mdlm.data.packing import ArrayWrapPacker, pack_pad_arrays
from mdlm.data.sources import (
    DEFAULT_CORPUS,
    EXTENSIONS,
    DataError,
    file_documents,
    format_of,
    shakespeare_files,
)
from mdlm.data.splits import assign_split
from mdlm.data.tokenizer import (
    PRETRAINED,
    SpecialTokens,
    pretrained_version,
    special_tokens,
    tokenizer_from_spec,
    train_bpe,
)
from mdlm.runtime import init_ray

TOKENIZER_FILE = "tokenizer.json"
READ_CPUS = 0.25  # logical CPUs of a read/document task: reading is light, tokenizing is not
RESERVED_CPUS = 0.5  # kept free of tokenizer actors so that read tasks are never starved
# Document blocks of about this size: one big file still becomes many tokenizer tasks (Ray bundles whole
# blocks per task; a streaming repartition would need a full CPU of its own and starves on small machines).
BLOCK_BYTES = 2 * 2**20
READ_TASK_BYTES = 8 * 2**20
MAX_READ_TASKS = 1000
# Settings that change how the work runs, not what it produces: left out of the fingerprint.
EXECUTION_FIELDS = ("output_dir", "num_workers", "batch_size", "force")

_DOC_SCHEMA = pa.schema([("text", pa.large_string()), ("split", pa.string()), ("file", pa.int32()),
                         ("doc", pa.int64()), ("error", pa.string())])


# ---------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceFile:
    """One input file. ``key``: the stable prefix of its documents' keys (path relative to the source root;
    the work's name for the default corpus), so the split does not depend on where the corpus lives."""

    path: str
    key: str
    format: str
    size: int
    modified: str


@dataclass
class Source:
    """A resolved ``data.source``: files (local or fsspec) or a Hugging Face split as an Arrow table."""

    spec: str
    kind: str  # 'shakespeare', 'files' or 'hf'
    files: list[SourceFile] = field(default_factory=list)
    filesystem: Any = None  # pyarrow filesystem for non-local URLs (None: local paths)
    hf_table: pa.Table | None = None
    hf_key: str = ""
    hf_fingerprint: str = ""

    @property
    def num_bytes(self) -> int:
        if self.kind == "hf":
            return self.hf_table.nbytes if self.hf_table is not None else 0
        return sum(f.size for f in self.files)

    def describe(self) -> dict[str, Any]:
        if self.kind == "hf":
            return {"spec": self.spec, "kind": self.kind, "rows": self.hf_table.num_rows if self.hf_table else 0,
                    "dataset_fingerprint": self.hf_fingerprint}
        formats = sorted({f.format for f in self.files})
        return {"spec": self.spec, "kind": self.kind, "files": len(self.files),
                "bytes": sum(f.size for f in self.files), "formats": formats}

    def identity(self) -> list[Any]:
        if self.kind == "hf":
            return [self.hf_key, self.hf_fingerprint]
        return [[f.key, f.format, f.size, f.modified] for f in self.files]


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
        filesystem = pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))
    return Source(config.source, "files", files, filesystem)


def _hf_source(config: DataConfig) -> Source:
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
    table = dataset.select_columns([config.text_field]).with_format("arrow")[:]
    kind = table.schema.field(config.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"data.source={config.source!r}: column {config.text_field!r} has type {kind}, "
                        "not string")
    key = f"hf:{name}:{subset}:{config.hf_split}"
    return Source(config.source, "hf", hf_table=table, hf_key=key, hf_fingerprint=dataset._fingerprint)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and fingerprint


def load_tokenizer_for(config: DataConfig) -> tuple[Tokenizer, SpecialTokens]:
    """The pretrained / file tokenizer of ``data.tokenizer`` with [MASK]; a :class:`DataError` if it cannot be
    loaded or lacks the [BOS]/[EOS] tokens that packing needs."""
    try:
        tokenizer = tokenizer_from_spec(config.tokenizer)
    except FileNotFoundError as exc:
        raise DataError(f"data.tokenizer={config.tokenizer!r}: {exc}") from None
    except Exception as exc:  # tokenizers raises plain Exceptions on malformed files
        raise DataError(f"data.tokenizer={config.tokenizer!r}: cannot load it ({exc})") from None
    return tokenizer, _specials(tokenizer, config.tokenizer)


def _specials(tokenizer: Tokenizer, name: str) -> SpecialTokens:
    try:
        return special_tokens(tokenizer)
    except ValueError as exc:
        raise DataError(f"data.tokenizer={name!r}: {exc}; packing needs both") from None


def _tokenizer_identity(spec: str) -> str:
    if spec == "bpe" or spec in PRETRAINED:
        return spec if spec == "bpe" else pretrained_version(spec)
    path = Path(spec)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else spec


def fingerprint(config: DataConfig, source: Source) -> str:
    """Hash of what determines the output: the data config (less execution settings), the source files'
    names, sizes and modification times (or the Hugging Face dataset fingerprint), the tokenizer and the
    format version."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS}
    payload = {"format_version": FORMAT_VERSION, "config": settings, "source": source.identity(),
               "tokenizer": _tokenizer_identity(config.tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------
# Ray Data stages (module-level so that Ray pickles them by reference)


def _doc_table(texts: list[str], splits: list[str], files: list[int], docs: list[int],
               errors: list[str | None]) -> pa.Table:
    return pa.Table.from_arrays([pa.array(texts, pa.large_string()), pa.array(splits, pa.string()),
                                 pa.array(files, pa.int32()), pa.array(docs, pa.int64()),
                                 pa.array(errors, pa.string())], schema=_DOC_SCHEMA)


def file_documents_batch(batch: pa.Table, *, files: dict[str, tuple[int, str, str]], text_field: str,
                         encoding: str, max_chars: int, validation: float, test: float, seed: int,
                         only_split: str | None = None) -> pa.Table:
    """Ray task: files (``path``, ``bytes``) -> documents with their split; a bad file -> one error row."""
    texts, splits, file_ids, doc_ids, errors = [], [], [], [], []
    for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist(), strict=True):
        index, key, fmt = files[path]
        try:
            docs = file_documents(data, path, fmt, text_field=text_field, encoding=encoding, max_chars=max_chars)
        except DataError as exc:
            texts.append(""), splits.append(""), file_ids.append(index), doc_ids.append(-1)
            errors.append(str(exc))
            continue
        for doc_index, text in docs:
            split = assign_split(f"{key}:{doc_index}", validation, test, seed)
            if only_split is None or split == only_split:
                texts.append(text), splits.append(split), file_ids.append(index), doc_ids.append(doc_index)
                errors.append(None)
    return _doc_table(texts, splits, file_ids, doc_ids, errors)


def hf_documents_batch(batch: pa.Table, *, text_field: str, key: str, validation: float, test: float, seed: int,
                       only_split: str | None = None) -> pa.Table:
    """Ray task: Hugging Face rows (text, ``row`` index) -> documents with their split (key ``NAME:row``)."""
    texts, splits, rows = [], [], []
    for text, row in zip(batch[text_field].to_pylist(), batch["row"].to_pylist(), strict=True):
        if text:
            split = assign_split(f"{key}:{row}", validation, test, seed)
            if only_split is None or split == only_split:
                texts.append(text), splits.append(split), rows.append(row)
    return _doc_table(texts, splits, [0] * len(texts), rows, [None] * len(texts))


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _rows_array(rows: np.ndarray) -> pa.ListArray:
    """``[n, block]`` -> list array of n rows."""
    return _list_array(rows.reshape(-1), np.full(len(rows), rows.shape[1] if rows.ndim == 2 else 0))


class TokenizeBatch:
    """Ray Data actor: loads the tokenizer once, then tokenizes batches of documents single-threaded
    (``pad`` mode: also packs each document into its row)."""

    def __init__(self, tokenizer: str, packing: str, block_size: int, special: SpecialTokens) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per actor: the pool is the parallelism
        os.environ["RAYON_NUM_THREADS"] = "1"
        self.tokenizer = tokenizer_from_spec(tokenizer) if tokenizer in PRETRAINED else Tokenizer.from_str(tokenizer)
        self.packing, self.block_size, self.special = packing, block_size, special

    def __call__(self, batch: pa.Table) -> pa.Table:
        # encode_batch_fast: the same ids as encode_batch without computing character offsets (~1.3x faster).
        encodings = self.tokenizer.encode_batch_fast(batch["text"].to_pylist(), add_special_tokens=False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        meta = {name: batch[name] for name in ("split", "file", "doc", "error")}
        if self.packing == "wrap":
            return pa.table({"ids": _list_array(values, lengths), **meta})
        s = self.special
        input_ids, mask = pack_pad_arrays(values, lengths, self.block_size, s.bos_id, s.eos_id, s.pad_id)
        return pa.table({"input_ids": _rows_array(input_ids), "attention_mask": _rows_array(mask), **meta})


# ---------------------------------------------------------------------------------------------------------
# The pipeline


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size
    ctx.execution_options.preserve_order = True  # output rows independent of scheduling
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved


def documents_dataset(source: Source, config: DataConfig, only_split: str | None = None):
    """The Ray dataset of documents (``text``, ``split``, ``file``, ``doc``, ``error``), in corpus order."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))

    split_args = {"validation": config.validation_fraction, "test": config.test_fraction, "seed": config.seed,
                  "only_split": only_split}
    if source.kind == "hf":
        table = source.hf_table
        step = max(1, config.batch_size * 8)
        pieces = [table.slice(i, step).append_column("row", pa.array(np.arange(i, min(i + step, len(table)))))
                  for i in range(0, len(table), step)]
        ds = ray.data.from_arrow(pieces)
        return ds.map_batches(hf_documents_batch, batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS,
                              fn_kwargs={"text_field": config.text_field, "key": source.hf_key, **split_args})
    files = {f.path: (i, f.key, f.format) for i, f in enumerate(source.files)}
    # Read tasks of about READ_TASK_BYTES (at least two per CPU while there are files): Ray task overhead
    # stays small next to the work. No batch size, so Ray fuses the read with the document stage and file
    # bytes never travel through the object store.
    total = sum(f.size for f in source.files)
    tasks = min(len(source.files), MAX_READ_TASKS, max(2 * cpus, -(-total // READ_TASK_BYTES)))
    ds = ray.data.read_binary_files([f.path for f in source.files], include_paths=True,
                                    filesystem=source.filesystem, num_cpus=READ_CPUS, override_num_blocks=tasks)
    return ds.map_batches(file_documents_batch, batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS,
                          fn_kwargs={"files": files, "text_field": config.text_field, "encoding": config.encoding,
                                     "max_chars": config.max_document_chars, **split_args})


def _first_error(batch: pa.Table) -> str | None:
    errors = batch["error"]
    if errors.null_count == len(errors):
        return None
    return next(e for e in errors.to_pylist() if e is not None)


def _train_tokenizer(source: Source, config: DataConfig) -> Tokenizer:
    """``bpe``: a byte-level BPE of ``tokenizer_vocab_size`` trained on the training documents only."""
    state = {"docs": 0, "error": None}

    def texts() -> Iterator[str]:
        for batch in documents_dataset(source, config, only_split="train").iter_batches(
                batch_size=None, batch_format="pyarrow"):
            state["error"] = _first_error(batch)
            if state["error"]:
                return
            state["docs"] += batch.num_rows
            yield from batch["text"].to_pylist()

    tokenizer = train_bpe(texts(), config.tokenizer_vocab_size)
    if state["error"]:
        raise DataError(state["error"])
    if not state["docs"]:
        raise DataError(f"data.source={config.source!r}: no training documents (the corpus is empty)")
    return tokenizer


class _SplitWriter:
    """Parquet files of exactly ``rows_per_file`` rows (the last one fewer) for one split."""

    def __init__(self, root: Path, split: str, rows_per_file: int, row_group_rows: int) -> None:
        self.root, self.split, self.rows_per_file, self.row_group_rows = root, split, rows_per_file, row_group_rows
        (root / split).mkdir(parents=True, exist_ok=True)
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.pending_rows = 0
        self.info = SplitInfo(path=split)

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        if not len(ids):
            return
        self.pending.append((ids, mask))
        self.pending_rows += len(ids)
        while self.pending_rows >= self.rows_per_file:
            self._write(self.rows_per_file)

    def close(self) -> SplitInfo:
        if self.pending_rows:
            self._write(self.pending_rows)
        return self.info

    def _write(self, n: int) -> None:
        ids = np.concatenate([p[0] for p in self.pending])
        masks = None if self.pending[0][1] is None else np.concatenate([p[1] for p in self.pending])
        columns = {"input_ids": _rows_array(ids[:n])}
        if masks is not None:
            columns["attention_mask"] = _rows_array(masks[:n])
        name = f"{self.split}/part-{len(self.info.files):05d}.parquet"
        pq.write_table(pa.table(columns), self.root / name, row_group_size=self.row_group_rows, compression="zstd")
        self.info.files.append(name)
        self.info.rows += n
        self.info.tokens += int(masks[:n].sum()) if masks is not None else ids[:n].size
        self.pending = [(ids[n:], None if masks is None else masks[n:])] if len(ids) > n else []
        self.pending_rows = len(ids) - n


def _pack_and_write(stream: Iterator[pa.Table], config: DataConfig, special: SpecialTokens, root: Path,
                    check_order: bool, timings: dict[str, float]) -> dict[str, SplitInfo]:
    """Consume the ordered tokenized stream: wrap-pack per split (carrying remainders) and write files.
    ``timings``: when the first tokenized batch arrived (``first_rows``, perf_counter) and how many rows it had
    (``first_batch_rows``)."""
    row_bytes = config.block_size * (4 + (config.packing == "pad"))
    rows_per_file = max(1, int(config.file_size_mb * 2**20 // row_bytes))
    row_group_rows = max(1, min(rows_per_file, 8 * 2**20 // row_bytes))
    writers = {s: _SplitWriter(root, s, rows_per_file, row_group_rows) for s in SPLITS}
    packers = {s: ArrayWrapPacker(config.block_size, special.bos_id, special.eos_id) for s in SPLITS}
    last = -1
    for batch in stream:
        if "first_rows" not in timings:
            timings["first_rows"], timings["first_batch_rows"] = time.perf_counter(), batch.num_rows
        error = _first_error(batch)
        if error:
            raise DataError(error)
        if check_order and batch.num_rows:
            order = batch["file"].to_numpy().astype(np.int64) * 2**40 + batch["doc"].to_numpy()
            if order[0] <= last or np.any(np.diff(order) <= 0):
                raise RuntimeError("the document stream arrived out of order (is preserve_order off?)")
            last = int(order[-1])
        split_column = batch["split"]
        for split in SPLITS:
            selected = pc.equal(split_column, split)
            count = pc.sum(selected).as_py() or 0
            if not count:
                continue
            writers[split].info.documents += count
            if config.packing == "wrap":
                ids = batch["ids"].filter(selected)
                values = pc.list_flatten(ids).to_numpy()
                lengths = pc.list_value_length(ids).to_numpy()
                writers[split].add(packers[split].add(values, lengths))
            else:
                shape = (count, config.block_size)
                ids = pc.list_flatten(batch["input_ids"].filter(selected)).to_numpy().reshape(shape)
                mask = pc.list_flatten(batch["attention_mask"].filter(selected)).to_numpy().reshape(shape)
                writers[split].add(ids, mask)
    infos = {s: w.close() for s, w in writers.items()}
    if config.packing == "wrap":
        for split, info in infos.items():
            info.dropped_tokens = len(packers[split].buffer)
    return infos


def _check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise DataError(f"data.output_dir={out} exists and is not a prepared dataset (no {MANIFEST_NAME}); "
                        "remove it or choose another directory")


def _temp_dir(out: Path) -> Path:
    """A fresh temporary sibling of ``out``; leftovers of earlier runs on this host that died (their process
    is gone) are removed first."""
    host = socket.gethostname().replace("-", "_")
    for stale in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return out.parent / f".{out.name}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(config: DataConfig, *, force: bool | None = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> Manifest:
    """Prepare ``config.source`` into ``config.output_dir`` (train/validation/test parquet, tokenizer.json,
    manifest.json) and return its :class:`Manifest`; reuse an identical earlier output unless ``force``.

    Bad input raises :class:`DataError` (bad settings: ``ConfigError``; both ``ValueError``) and leaves
    nothing behind."""
    log = log or (lambda message: None)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    config.validate("data")
    force = config.force if force is None else force
    if "://" in config.output_dir:
        raise DataError(f"data.output_dir={config.output_dir!r}: must be a local path (the dataset is written "
                        "to a temporary sibling directory and renamed into place)")
    out = Path(config.output_dir).expanduser().absolute()
    source = resolve_source(config)
    tokenizer, special = load_tokenizer_for(config) if config.tokenizer != "bpe" else (None, None)
    digest = fingerprint(config, source)
    if not force:
        with contextlib.suppress(FileNotFoundError, ManifestError):
            existing = load_manifest(out)
            if existing.fingerprint == digest:
                log(f"reusing {out} (same inputs and config, fingerprint {digest}); --force re-prepares it")
                existing.reused = True
                return existing
    _check_output_dir(out)

    import ray
    from ray.data import ActorPoolStrategy

    created = next((p for p in [out.parent, *out.parent.parents][::-1] if not p.exists()), None)
    tmp = _temp_dir(out) if out.parent.exists() else out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    described = source.describe()
    log(f"reading {config.source}: " + (f"{described['rows']:,} rows" if source.kind == "hf" else
                                        f"{described['files']} files, {described['bytes'] / 2**20:.1f} MB"))
    started = init_ray()
    try:
        tmp.mkdir(parents=True)
        with _data_context(progress):
            if tokenizer is None:
                log(f"training a byte-level BPE of {config.tokenizer_vocab_size} tokens on the training split")
                tokenizer = _train_tokenizer(source, config)
                special = _specials(tokenizer, config.tokenizer)
            tokenizer.save(str(tmp / TOKENIZER_FILE))
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            # Auto: one actor per CPU, but no more than there are document blocks (small corpora start faster).
            workers = config.num_workers or max(1, min(int(cpus), -(-source.num_bytes // BLOCK_BYTES)))
            actor_cpus = max(0.05, min(1.0, round((cpus - RESERVED_CPUS) / workers, 2)))
            tokenizer_arg = config.tokenizer if config.tokenizer in PRETRAINED else tokenizer.to_str()
            tokenized = documents_dataset(source, config).map_batches(
                TokenizeBatch, batch_size=config.batch_size, batch_format="pyarrow",
                compute=ActorPoolStrategy(size=workers), num_cpus=actor_cpus,
                fn_constructor_kwargs={"tokenizer": tokenizer_arg, "packing": config.packing,
                                       "block_size": config.block_size, "special": special})
            log(f"tokenizing with {workers} actors x {actor_cpus} CPU, packing '{config.packing}' into "
                f"{config.block_size}-token rows")
            stream = tokenized.iter_batches(batch_size=None, batch_format="pyarrow")
            timings["tokenize_start"] = time.perf_counter()
            splits = _pack_and_write(stream, config, special, tmp, check_order=source.kind != "hf",
                                     timings=timings)
        if not splits["train"].documents:
            raise DataError(f"data.source={config.source!r}: no training documents (the corpus is empty)")
        if not splits["train"].rows:
            raise DataError(f"data.source={config.source!r}: the training documents are too short for one "
                            f"row of data.block_size={config.block_size}")
        for split, fraction in (("validation", config.validation_fraction), ("test", config.test_fraction)):
            if fraction > 0 and not splits[split].rows:
                log(f"warning: the {split} split is empty (data.{split}_fraction={fraction} of "
                    f"{sum(i.documents for i in splits.values())} documents)")
        manifest = Manifest(
            format_version=FORMAT_VERSION, fingerprint=digest, source=described, tokenizer=config.tokenizer,
            tokenizer_file=TOKENIZER_FILE, vocab_size=special.vocab_size, mask_token_id=special.mask_id,
            bos_token_id=special.bos_id, eos_token_id=special.eos_id, pad_token_id=special.pad_id,
            block_size=config.block_size, packing=config.packing, splits=splits,
            config=dataclasses.asdict(config), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        manifest.save(tmp)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and not out.exists():
            with contextlib.suppress(OSError):
                for path in [out.parent, *out.parent.parents]:
                    path.rmdir()  # only empty folders this call created
                    if path == created:
                        break
        if started:
            ray.shutdown()
    manifest.root = out
    end = time.perf_counter()
    first = timings.get("first_rows", end)
    manifest.timings = {"total": end - start, "tokenize": end - timings.get("tokenize_start", start),
                        "first_rows": first - timings.get("tokenize_start", start), "after_first_rows": end - first,
                        "first_batch_documents": timings.get("first_batch_rows", 0)}
    return manifest
