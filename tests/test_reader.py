"""The prepared parquet read back by a training worker itself (``mdlm.data.reader.ParquetRows``): rows in file
order, the seeded shuffle buffer, limits, and bad files named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlm.data.reader import ParquetRows


def _files(tmp_path, sizes=(5, 7, 1, 11), mask: bool = False) -> tuple[str, ...]:
    files, start = [], 0
    for k, n in enumerate(sizes):
        ids = [[i, i, i] for i in range(start, start + n)]
        table = {"input_ids": pa.array(ids, pa.list_(pa.int32()))}
        if mask:
            table["attention_mask"] = pa.array([[1, 1, 0]] * n, pa.list_(pa.int8()))
        pq.write_table(pa.table(table), tmp_path / f"part-{k}.parquet", row_group_size=3)
        files.append(str(tmp_path / f"part-{k}.parquet"))
        start += n
    return tuple(files)


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_rows_come_in_file_order_in_whole_batches(tmp_path):
    rows = ParquetRows(_files(tmp_path))  # 24 rows over 4 files and 3-row row groups
    batches = list(rows.iter_batches(batch_size=5))
    assert _ids(batches) == [list(range(i, i + 5)) for i in range(0, 20, 5)]  # rows 20-23 dropped (drop_last)
    assert batches[0]["input_ids"].shape == (5, 3) and batches[0]["input_ids"].dtype == np.int32
    assert _ids(rows.iter_batches(batch_size=5, drop_last=False))[-1] == [20, 21, 22, 23]


def test_limit_and_the_attention_mask(tmp_path):
    rows = ParquetRows(_files(tmp_path, mask=True), limit=8)
    batches = list(rows.iter_batches(batch_size=3, drop_last=False))
    assert _ids(batches) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 0]] * 3


def test_the_shuffle_buffer_is_seeded_and_keeps_every_row_once(tmp_path):
    rows = ParquetRows(_files(tmp_path))
    a = _ids(rows.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1))
    assert a == _ids(rows.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1))
    assert a != _ids(rows.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=2))
    flat = [i for batch in a for i in batch]
    assert len(flat) == 24 and sorted(flat) == list(range(24))  # 24 rows = 6 whole batches: none dropped
    assert flat != sorted(flat)
    # A buffer of 8 rows: the first batch is drawn from the first 8 rows, the second from those left and 8-11.
    assert max(a[0]) < 8 and max(a[1]) < 12
    assert _ids(rows.iter_batches(batch_size=4, local_shuffle_buffer_size=2, local_shuffle_seed=1))[0] != [0, 1, 2, 3]


def test_bad_files_are_named(tmp_path):
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), ragged)
    with pytest.raises(ValueError, match=r"ragged\.parquet.*different lengths"):
        list(ParquetRows((str(ragged),)).iter_batches(batch_size=1))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["a"]}), other)
    with pytest.raises(ValueError, match=r"other\.parquet: no 'input_ids' column"):
        list(ParquetRows((str(other),)).iter_batches(batch_size=1))
    with pytest.raises(FileNotFoundError):
        list(ParquetRows((str(tmp_path / "missing.parquet"),)).iter_batches(batch_size=1))
