"""The driver end of the Ray pipeline: the ordered tokenized stream -> ``wrap`` packing per split -> parquet files.

Each split gets files of exactly ``rows_per_file`` rows (the last one fewer): ``input_ids`` list<int32>, plus
``attention_mask`` list<int8> in ``pad`` mode. ``wrap`` packing carries one remainder per split across batches
(:class:`~mdlm.data.packing.ArrayWrapPacker`), which is why this runs in one place, in stream order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdlm.config import DataConfig
from mdlm.data.manifest import SplitInfo
from mdlm.data.packing import ArrayWrapPacker
from mdlm.data.sources import DataError
from mdlm.data.splits import SPLITS
from mdlm.data.tokenizer import SpecialTokens


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


class SplitWriter:
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
        columns = {"input_ids": rows_array(ids[:n])}
        if masks is not None:
            columns["attention_mask"] = rows_array(masks[:n])
        name = f"{self.split}/part-{len(self.info.files):05d}.parquet"
        pq.write_table(pa.table(columns), self.root / name, row_group_size=self.row_group_rows, compression="zstd")
        self.info.files.append(name)
        self.info.rows += n
        self.info.tokens += int(masks[:n].sum()) if masks is not None else ids[:n].size
        self.pending = [(ids[n:], None if masks is None else masks[n:])] if len(ids) > n else []
        self.pending_rows = len(ids) - n


def pack_and_write(stream: Iterator[pa.Table], config: DataConfig, special: SpecialTokens, root: Path,
                   check_order: bool, timings: dict[str, float]) -> dict[str, SplitInfo]:
    """Consume the ordered tokenized stream: wrap-pack per split (carrying remainders) and write files under
    ``root``. ``check_order``: fail if the (file, doc) order ever goes backwards. ``timings``: when the first
    tokenized batch arrived (``first_rows``, perf_counter) and how many rows it had (``first_batch_rows``)."""
    row_bytes = config.block_size * (4 + (config.packing == "pad"))
    rows_per_file = max(1, int(config.file_size_mb * 2**20 // row_bytes))
    row_group_rows = max(1, min(rows_per_file, 8 * 2**20 // row_bytes))
    writers = {s: SplitWriter(root, s, rows_per_file, row_group_rows) for s in SPLITS}
    packers = {s: ArrayWrapPacker(config.block_size, special.bos_id, special.eos_id) for s in SPLITS}
    last = -1
    for batch in stream:
        if "first_rows" not in timings:
            timings["first_rows"], timings["first_batch_rows"] = time.perf_counter(), batch.num_rows
        error = first_error(batch)
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
