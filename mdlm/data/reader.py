"""The prepared parquet of a split read back as rows, by whichever process needs them (a training worker)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ROW_COLUMNS = ("input_ids", "attention_mask")
READ_ROWS = 4096  # rows per parquet read


@dataclass(frozen=True)
class ParquetRows:
    """A split's parquet files (local paths or fsspec URLs, in row order), read by the worker itself with pyarrow.

    Every rank reads the whole unsplit stream anyway (:class:`BatchStream`), so no Ray Data tasks are needed: the
    stream takes no CPU beyond the worker's own, starts at once, and a worker group of any size, an elastic one
    included, reads it. ``limit``: only the first rows (validation)."""

    files: tuple[str, ...]
    limit: int | None = None

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows in file order, as ``{column: int array [rows, L]}`` chunks of at most ``READ_ROWS`` rows."""
        import pyarrow.parquet as pq

        from mdlm.storage import filesystem

        left = self.limit
        for path in self.files:
            fs, where = filesystem(path)
            with fs.open(where, "rb") as f:
                parquet = pq.ParquetFile(f)
                names = [c for c in ROW_COLUMNS if c in parquet.schema_arrow.names]
                if "input_ids" not in names:
                    raise ValueError(f"{path}: no 'input_ids' column (columns: {parquet.schema_arrow.names})")
                for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=names):
                    chunk = {name: _matrix(batch.column(name), path, name) for name in names}
                    if left is not None:
                        chunk = {k: v[:left] for k, v in chunk.items()}
                        left -= len(chunk["input_ids"])
                    yield chunk
                    if left is not None and left <= 0:
                        return

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = True,
                     local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` rows, as Ray Data's ``iter_batches`` gives them (numpy only).

        With a shuffle buffer of ``S`` rows (at least one batch), filled from the stream first, each batch is drawn
        without replacement from the buffer and the next rows of the stream take the places it leaves; when the
        stream ends, what is left comes out in a random order. The generator is seeded by ``local_shuffle_seed``:
        the same rows in the same order on every rank and every run, at a cost per batch of its own rows."""
        if batch_format != "numpy":
            raise ValueError(f"batch_format {batch_format!r}: only 'numpy'")
        least = batch_size if drop_last else 1
        rows = _Rows(self.chunks())
        if not local_shuffle_buffer_size:
            while (batch := rows.take(batch_size)) is not None and _count(batch) >= least:
                yield batch
            return
        rng = np.random.default_rng(local_shuffle_seed)
        buffer = rows.take(max(local_shuffle_buffer_size, batch_size))
        if buffer is None:
            return
        buffer = {k: np.array(v) for k, v in buffer.items()}  # writable: the stream's rows replace drawn ones
        while True:
            incoming = rows.take(batch_size)
            if incoming is None or _count(incoming) < batch_size:  # the stream ends: drain the buffer
                rest = buffer if incoming is None else {k: np.concatenate([v, incoming[k]]) for k, v in buffer.items()}
                order = rng.permutation(_count(rest))
                for i in range(0, len(order), batch_size):
                    if len(order[i:i + batch_size]) >= least:
                        yield {k: v[order[i:i + batch_size]] for k, v in rest.items()}
                return
            picked = rng.choice(_count(buffer), size=batch_size, replace=False)
            batch = {k: v[picked] for k, v in buffer.items()}  # fancy indexing copies
            for k, v in buffer.items():
                v[picked] = incoming[k]
            yield batch


class _Rows:
    """Rows of a stream of chunks taken ``n`` at a time across chunk boundaries."""

    def __init__(self, chunks: Iterator[dict[str, np.ndarray]]) -> None:
        self._chunks = chunks
        self._head: dict[str, np.ndarray] | None = None

    def take(self, n: int) -> dict[str, np.ndarray] | None:
        """The next ``n`` rows (fewer at the end; None when none are left)."""
        parts, got = [], 0
        while got < n:
            if self._head is None or not _count(self._head):
                self._head = next(self._chunks, None)
                if self._head is None:
                    break
                continue
            k = min(n - got, _count(self._head))
            parts.append({c: v[:k] for c, v in self._head.items()})
            self._head = {c: v[k:] for c, v in self._head.items()}
            got += k
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _count(rows: dict[str, np.ndarray]) -> int:
    return len(rows["input_ids"])


def _matrix(column, path: str, name: str) -> np.ndarray:
    """A list column of equal-length rows as a 2-D array (packed rows all have the block's length)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(f"{path}: column {name!r} holds rows of different lengths; prepared rows have one length")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(lengths), -1 if len(lengths) else 0)
