"""Reading the evaluated rows: a Ray Data datasource that knows each row's corpus and index.

:class:`IndexedParquetDatasource` reads the prepared splits of several corpora in one dataset, tags every row with
its corpus (``corpus``) and its index in the split (``row_index``), and emits blocks of exactly ``block_rows``
rows of one corpus, aligned on multiples of ``block_rows`` (the last one shorter), so that the NELBO actors score
the same groups of rows whatever the pool.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mdlm.eval import EvalInputError
from mdlm.eval.inputs import Corpus
from mdlm.runtime import READ_CPUS
from mdlm.storage import filesystem, is_url


@dataclass
class SplitFiles:
    """The parquet files of one corpus's split, as the datasource reads them."""

    files: list[str]
    file_rows: list[int]
    columns: list[str]
    rows: int  # rows to read (max_rows applied)
    row_bytes: int


def _parquet(path: str) -> pq.ParquetFile:
    """A parquet file, local or at a URL (read through fsspec)."""
    if not is_url(path):
        return pq.ParquetFile(path)
    fs, where = filesystem(path)
    return pq.ParquetFile(fs.open(where, "rb"))


def _split_columns(path: str, data: str) -> list[str]:
    names = _parquet(path).schema_arrow.names
    if "input_ids" not in names:
        raise EvalInputError("data", f"{path}: no 'input_ids' column (columns: {', '.join(names)})", value=data)
    return [c for c in ("input_ids", "attention_mask") if c in names]


def split_files(corpus: Corpus) -> SplitFiles:
    """The files of the corpus's split, checked: one set of columns with ``input_ids``, at least the manifest's
    rows."""
    data = str(corpus.path)
    files = corpus.manifest.split_files(corpus.split)
    metadata = [_parquet(f).metadata for f in files]
    total = sum(m.num_rows for m in metadata)
    on_disk = sum(m.row_group(g).total_byte_size for m in metadata for g in range(m.num_row_groups))
    columns = _split_columns(files[0], data)
    if any(_split_columns(f, data) != columns for f in files[1:]):
        raise EvalInputError("data", f"the {corpus.split} files do not share one set of columns", value=data)
    if total < corpus.rows:
        raise EvalInputError("data", f"the {corpus.split} files hold {total} rows, fewer than the manifest's "
                             f"{corpus.manifest.rows(corpus.split)}; prepare the data again", value=data)
    return SplitFiles(files=files, file_rows=[m.num_rows for m in metadata], columns=columns,
                      rows=min(total, corpus.rows), row_bytes=max(1, on_disk // max(total, 1)))


def _read_rows(corpus: int, files: Sequence[str], file_rows: Sequence[int], columns: list[str], start: int,
               stop: int, block_rows: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of one corpus's concatenated files, with ``corpus`` and ``row_index`` columns, in blocks
    of ``block_rows`` rows."""
    parts = []
    offset = 0
    for path, count in zip(files, file_rows, strict=True):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            parquet = _parquet(path)
            groups, group_start, first_group_start = [], 0, None
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if group_start < hi - offset and group_start + n > lo - offset:
                    groups.append(g)
                    first_group_start = group_start if first_group_start is None else first_group_start
                group_start += n
            table = parquet.read_row_groups(groups, columns=columns)
            parts.append(table.slice(lo - offset - first_group_start, hi - lo))
        offset += count
    table = pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]
    table = table.append_column("corpus", pa.array(np.full(stop - start, corpus, dtype=np.int32)))
    table = table.append_column("row_index", pa.array(np.arange(start, stop, dtype=np.int64)))
    for begin in range(0, table.num_rows, block_rows):
        yield table.slice(begin, block_rows)


class IndexedParquetDatasource(Datasource):
    """The evaluated rows of several corpora's splits, each tagged with its corpus number (``corpus``) and its
    index in that split (``row_index``), in blocks of ``block_rows`` rows of one corpus aligned on multiples of
    ``block_rows``."""

    def __init__(self, splits: Sequence[SplitFiles], block_rows: int) -> None:
        super().__init__()
        self.splits, self.block_rows = list(splits), block_rows
        # Every block: (corpus, first row, end row).
        self.blocks = [(c, start, min(start + block_rows, split.rows)) for c, split in enumerate(self.splits)
                       for start in range(0, split.rows, block_rows)]

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(split.rows * split.row_bytes for split in self.splits)

    def get_name(self) -> str:
        return "IndexedParquet"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        count = len(self.blocks)
        tasks = max(1, min(parallelism if parallelism > 0 else count, count))
        bounds = np.linspace(0, count, tasks + 1).round().astype(int)
        out = []
        for lo, hi in itertools.pairwise(bounds):
            # One task's blocks, as contiguous row ranges of each corpus they belong to.
            for corpus in sorted({self.blocks[i][0] for i in range(lo, hi)}):
                mine = [self.blocks[i] for i in range(lo, hi) if self.blocks[i][0] == corpus]
                split, start, stop = self.splits[corpus], mine[0][1], mine[-1][2]
                args = (corpus, split.files, split.file_rows, split.columns, start, stop, self.block_rows)
                meta = BlockMetadata(num_rows=stop - start, size_bytes=int((stop - start) * split.row_bytes),
                                     input_files=split.files, exec_stats=None)
                out.append(ReadTask(lambda args=args: _read_rows(*args), meta, per_task_row_limit=per_task_row_limit))
        return out


def read_indexed_splits(corpora: Sequence[Corpus], block_rows: int):
    """The Ray dataset of the corpora's evaluated rows: ``input_ids`` [, ``attention_mask``], ``corpus`` (position
    in ``corpora``), ``row_index`` (position in its split)."""
    source = IndexedParquetDatasource([split_files(c) for c in corpora], block_rows)
    return ray.data.read_datasource(source, num_cpus=READ_CPUS)
