"""The worker end of preparation: a task's rows -> parquet shards on any filesystem, with their checksums.

``wrap`` packing is one token stream per split (every document followed by [EOS]) cut into chunks of
``block_size - 2`` tokens. :func:`wrap_rows` gives the rows whose chunk *starts* in one task's part of that
stream, from the stream position where the task starts (known from the earlier tasks' token counts) and the
first tokens of the following tasks: every task's rows come out exactly as one sequential packer would cut
them, so the rows do not depend on how the corpus is cut into tasks or on the number of workers.

:class:`ShardWriter` writes files of at most ``rows_per_file`` rows (``input_ids`` list<int32>, plus
``attention_mask`` list<int8> in ``pad`` mode), each published whole (a temporary file renamed into place, or
one object-store PUT), and returns their :class:`~mdlm.data.manifest.ShardInfo` (rows, tokens, bytes, SHA-256).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdlm.data.manifest import ShardInfo
from mdlm.storage import filesystem, write_bytes_atomic


def list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """A list array of ``len(lengths)`` lists cut from ``values`` (a large list past 2**31 values)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def rows_array(rows: np.ndarray) -> pa.ListArray:
    """``[n, block]`` -> list array of n rows."""
    return list_array(rows.reshape(-1), np.full(len(rows), rows.shape[1] if rows.ndim == 2 else 0))


def first_error(batch: pa.Table) -> str | None:
    """The first input error a Ray task reported in ``batch`` (its ``error`` column), if any."""
    errors = batch["error"]
    if errors.null_count == len(errors):
        return None
    return next(e for e in errors.to_pylist() if e is not None)


def wrap_rows(position: int, own: np.ndarray, following: np.ndarray, block_size: int, bos_id: int,
              eos_id: int) -> np.ndarray:
    """The ``wrap`` rows ``[n, block_size]`` whose chunk starts in ``own``: the task's tokens, which begin at
    ``position`` of the split's stream; ``following``: the stream after it (enough of it to finish the last
    row, or all there is). The stream's final remainder, shorter than a chunk, makes no row."""
    chunk = block_size - 2
    skip = (-position) % chunk  # the first tokens end the row that started in an earlier task
    starts = max(0, -(-(len(own) - skip) // chunk))
    stream = np.concatenate([own[skip:], following[:starts * chunk]]) if starts else own[:0]
    n = min(starts, len(stream) // chunk)
    rows = np.empty((n, block_size), dtype=np.int32)
    rows[:, 0] = bos_id
    rows[:, -1] = eos_id
    rows[:, 1:-1] = stream[:n * chunk].reshape(n, chunk)
    return rows


class ShardWriter:
    """Writes a task's rows of one split as ``<folder>/<split>/part-<task>-<k>.parquet`` under ``root``."""

    def __init__(self, root: str, folder: str, rows_per_file: int, row_group_rows: int) -> None:
        self.fs, self.base = filesystem(root)
        self.folder, self.rows_per_file, self.row_group_rows = folder, rows_per_file, row_group_rows

    def write(self, split: str, task: int, ids: np.ndarray, mask: np.ndarray | None = None) -> list[ShardInfo]:
        shards = []
        for k, start in enumerate(range(0, len(ids), self.rows_per_file)):
            part_ids = ids[start:start + self.rows_per_file]
            columns = {"input_ids": rows_array(part_ids)}
            tokens = part_ids.size
            if mask is not None:
                part_mask = mask[start:start + self.rows_per_file]
                columns["attention_mask"] = rows_array(part_mask)
                tokens = int(part_mask.sum())
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(columns), sink, row_group_size=self.row_group_rows, compression="zstd")
            data = sink.getvalue().to_pybytes()
            relative = f"{self.folder}/{split}/part-{task:05d}-{k:03d}.parquet"
            write_bytes_atomic(self.fs, f"{self.base.rstrip('/')}/{relative}", data)
            shards.append(ShardInfo(path=relative, rows=len(part_ids), tokens=tokens, bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest()))
        return shards
