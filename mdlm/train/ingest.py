"""A worker's training data: the prepared parquet (or a Ray Dataset) as micro-batches on the device, resumable
mid-epoch."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from mdlm.train.checkpoint import TrainProgress


class Collate(NumpyBatchCollateFn):
    """Ray Data numpy batch (list columns) -> LongTensors [B, L] on ``device``. A ``NumpyBatchCollateFn``, so
    ``iter_torch_batches`` hands it numpy batches (as it did plain functions, which Ray 2.47 deprecated)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("input_ids", "attention_mask"):
            if key in batch:
                column = batch[key]
                array = np.stack(column) if column.dtype == object else column
                out[key] = torch.as_tensor(array.astype(np.int64), device=self.device)
        return out


class BatchStream:
    """This rank's micro-batches of the run's one global order of rows, resumable at a global position.

    Every rank reads the same stream (the training dataset is not split: same files, same seeded shuffle) and cuts
    it into micro-batches; each optimizer step takes the next ``world x accumulation`` of them (the global batch)
    and rank ``r`` keeps those whose index ``j`` in it has ``j % world == r``. So the rows of every global batch,
    the order of global batches and the position saved in checkpoints (``batches_in_epoch``: micro-batches of
    the global stream) are the same whatever the number of workers: a run resized from 2 workers to 1 goes on
    with the next global batch. A global batch is read whole before any of it is used, so an epoch ends at the
    same place on every rank (its last, incomplete global batch is dropped). The price: every rank reads all
    rows, ``world`` times the reading of a split stream (the rows of one global batch per step)."""

    def __init__(self, dataset, batch_size: int, device: torch.device, seed: int, progress: TrainProgress,
                 shuffle_buffer: int, rank: int = 0, world: int = 1, accumulation: int = 1) -> None:
        self.dataset, self.batch_size, self.device, self.seed = dataset, batch_size, device, seed
        self.progress, self.shuffle_buffer = progress, shuffle_buffer
        self.rank, self.world, self.group = rank, world, world * accumulation
        self.collate = Collate(device)
        self._it: Iterator | None = None
        self._mine: collections.deque[tuple[int, dict[str, torch.Tensor]]] = collections.deque()

    def _epoch_iter(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=self.seed + self.progress.epoch if self.shuffle_buffer else None))

    def _next_global_batch(self) -> list[dict[str, np.ndarray]]:
        for _attempt in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
                for _ in range(self.progress.batches_in_epoch):  # resume mid-epoch: skip what was consumed
                    next(self._it)
            group = list(itertools.islice(self._it, self.group))
            if len(group) == self.group:
                return group
            if self.progress.batches_in_epoch == 0:
                break
            self.progress.epoch += 1
            self.progress.batches_in_epoch = 0
            self._it = None
        raise RuntimeError(f"the training data holds fewer rows than one global batch of {self.group} "
                           f"micro-batches of {self.batch_size}")

    def next_micro(self) -> tuple[int, dict[str, torch.Tensor]]:
        """``(j, batch)``: this rank's next micro-batch and its index ``j`` in the global batch."""
        if not self._mine:
            group = self._next_global_batch()
            self._mine.extend((j, self.collate(group[j])) for j in range(self.rank, self.group, self.world))
            self.progress.batches_in_epoch += self.group
        return self._mine.popleft()

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_micro()[1]


def first_batches(rows, batch_size: int, device: torch.device, limit: int) -> list[dict[str, torch.Tensor]]:
    """The first ``limit`` micro-batches of ``rows`` (a :class:`mdlm.data.reader.ParquetRows` or a Ray Data
    shard; validation), held in memory on ``device``."""
    collate = Collate(device)
    batches = []
    for batch in rows.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False):
        if len(batches) >= limit:
            break
        batches.append(collate(batch))
    return batches
