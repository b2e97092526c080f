"""The data order is the run's, not the worker group's: every rank reads the one global stream and keeps its
micro-batches of each global batch, so for 1, 2 or 4 workers the rows of every optimizer step are the same and a
checkpoint's position resumes on any number of workers. (Losing a node mid-run: test_lost_node.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mdlm.data.reader import ParquetRows
from mdlm.train.checkpoint import TrainProgress
from mdlm.train.ingest import BatchStream

pytestmark = pytest.mark.ray


@pytest.fixture(params=["parquet", "ray-data"])
def source(request, tmp_path):
    """The 100 rows (row i all i) as the launcher gives them (parquet files every worker reads) or as a Ray Dataset."""
    if request.param == "ray-data":
        ray = request.getfixturevalue("ray_local")
        return ray.data.from_items([{"input_ids": np.full(4, i, dtype=np.int64)} for i in range(100)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for k, (lo, hi) in enumerate([(0, 30), (30, 31), (31, 100)]):  # uneven files: batches span file boundaries
        path = tmp_path / f"part-{k}.parquet"
        pq.write_table(pa.table({"input_ids": [[i] * 4 for i in range(lo, hi)]}), path)
        files.append(str(path))
    return ParquetRows(tuple(files))


def _rows_of_steps(ds, world: int, steps: int, progress: TrainProgress | None = None, shuffle: int = 0,
                   start: int = 0) -> list[list[int]]:
    """The row ids each optimizer step trains on (all ranks together), for ``world`` ranks."""
    micro, global_batch = 2, 8
    streams = [BatchStream(ds, micro, _cpu(), seed=3, progress=progress or TrainProgress(), shuffle_buffer=shuffle,
                           rank=r, world=world, accumulation=global_batch // (micro * world)) for r in range(world)]
    if progress is not None:  # every rank resumes from the same saved position
        for s in streams:
            s.progress = TrainProgress(**vars(progress))
    out = []
    for _ in range(start, steps):
        rows: list[int] = []
        indices = []
        for s in streams:
            for _ in range(global_batch // (micro * world)):
                j, batch = s.next_micro()
                indices.append(j)
                rows.extend(batch["input_ids"][:, 0].tolist())
        assert sorted(indices) == list(range(global_batch // micro))  # every micro-batch of it, once
        out.append(sorted(rows))
    return out


def _cpu():
    import torch

    return torch.device("cpu")


@pytest.mark.parametrize("shuffle", [0, 16])
def test_every_step_trains_on_the_same_rows_whatever_the_world_size(source, shuffle):
    one = _rows_of_steps(source, 1, 15, shuffle=shuffle)
    assert _rows_of_steps(source, 2, 15, shuffle=shuffle) == one
    assert _rows_of_steps(source, 4, 15, shuffle=shuffle) == one
    if shuffle:
        assert one[0] != list(range(8))  # the buffer does reorder
    else:
        assert one[0] == list(range(8)) and one[11] == list(range(88, 96))  # 12 whole global batches of 100 rows
        assert one[12] == list(range(8))  # the next epoch starts over; rows 96-99 (half a batch) are dropped
    epoch = [row for rows in one[:12] for row in rows]
    assert len(epoch) == len(set(epoch)) == 96  # one epoch: every row at most once


def test_a_checkpointed_position_resumes_on_another_world_size(source):
    uninterrupted = _rows_of_steps(source, 1, 15, shuffle=16)
    saved = TrainProgress(step=5, epoch=0, batches_in_epoch=5 * 4)  # 5 steps of 4 global micro-batches
    assert _rows_of_steps(source, 2, 15, progress=saved, shuffle=16, start=5) == uninterrupted[5:]
    wrapped = TrainProgress(step=13, epoch=1, batches_in_epoch=4)
    assert _rows_of_steps(source, 4, 15, progress=wrapped, shuffle=16, start=13) == uninterrupted[13:]
