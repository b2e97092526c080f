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
        """Batches of ``batch_size`` rows, as Ray Data's ``iter_batches`` gives them (numpy only). With a shuffle
        buffer of ``S`` rows, each batch is drawn without replacement from the buffer once it holds
        ``S + batch_size`` rows (then from what is left at the end), with a generator seeded by
        ``local_shuffle_seed``: the same rows in the same order on every rank and every run."""
        if batch_format != "numpy":
            raise ValueError(f"batch_format {batch_format!r}: only 'numpy'")
        shuffle = local_shuffle_buffer_size or 0
        rng = np.random.default_rng(local_shuffle_seed)
        held: dict[str, np.ndarray] | None = None
        for chunk in self.chunks():
            held = chunk if held is None else {k: np.concatenate([held[k], chunk[k]]) for k in held}
            while len(held["input_ids"]) >= shuffle + batch_size:
                out, held = _take(held, batch_size, rng if shuffle else None)
                yield out
        while held is not None and len(held["input_ids"]) >= (batch_size if drop_last else 1):
            out, held = _take(held, batch_size, rng if shuffle else None)
            yield out


def _matrix(column, path: str, name: str) -> np.ndarray:
    """A list column of equal-length rows as a 2-D array (packed rows all have the block's length)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(f"{path}: column {name!r} holds rows of different lengths; prepared rows have one length")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(lengths), -1 if len(lengths) else 0)


def _take(held: dict[str, np.ndarray], n: int, rng: np.random.Generator | None):
    """``n`` rows out of ``held`` (the first ones, or drawn by ``rng``) and what is left."""
    total = len(held["input_ids"])
    if rng is None:
        return {k: v[:n] for k, v in held.items()}, {k: v[n:] for k, v in held.items()}
    picked = rng.choice(total, size=min(n, total), replace=False)
    keep = np.ones(total, dtype=bool)
    keep[picked] = False
    return {k: v[picked] for k, v in held.items()}, {k: v[keep] for k, v in held.items()}
