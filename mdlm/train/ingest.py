"""A worker's training data: its Ray Data shard as micro-batches on the device, resumable mid-epoch."""

from __future__ import annotations

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
    """Micro-batches from this rank's shard across epochs, resumable at (epoch, batches_in_epoch)."""

    def __init__(self, shard, batch_size: int, device: torch.device, seed: int, progress: TrainProgress,
                 shuffle_buffer: int) -> None:
        self.shard, self.batch_size, self.device, self.seed = shard, batch_size, device, seed
        self.progress, self.shuffle_buffer = progress, shuffle_buffer
        self._it: Iterator | None = None

    def _epoch_iter(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, collate_fn=Collate(self.device),
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=self.seed + self.progress.epoch if self.shuffle_buffer else None))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._epoch_iter()
            for _ in range(self.progress.batches_in_epoch):  # resume mid-epoch: skip what was consumed
                next(self._it)
        for _attempt in range(2):
            try:
                batch = next(self._it)
                self.progress.batches_in_epoch += 1
                return batch
            except StopIteration:
                if self.progress.batches_in_epoch == 0:
                    break
                self.progress.epoch += 1
                self.progress.batches_in_epoch = 0
                self._it = self._epoch_iter()
        raise RuntimeError(f"the training shard holds fewer rows than one micro-batch of {self.batch_size}")


def first_batches(shard, batch_size: int, device: torch.device, limit: int) -> list[dict[str, torch.Tensor]]:
    """The first ``limit`` micro-batches of a shard (validation), held in memory."""
    batches = []
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, collate_fn=Collate(device))):
        if i >= limit:
            break
        batches.append(batch)
    return batches
