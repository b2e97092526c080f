"""A worker's micro-batches: ``Collate`` is one of Ray Data's collate-function classes (no deprecation warning) and
turns the parquet list columns into the same int64 tensors."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.ray


def test_collate_gives_int64_rows_without_a_deprecation_warning(ray_local, tmp_path):
    ray = ray_local
    from ray.data.collate_fn import NumpyBatchCollateFn

    from mdlm.train.ingest import Collate

    ids = np.arange(24, dtype=np.int32).reshape(4, 6)
    mask = (ids % 5 != 0).astype(np.int8)
    table = pa.table({"input_ids": pa.array(ids.tolist(), pa.list_(pa.int32())),
                      "attention_mask": pa.array(mask.tolist(), pa.list_(pa.int8()))})
    pq.write_table(table, tmp_path / "rows.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "rows.parquet"))
    collate = Collate(torch.device("cpu"))
    assert isinstance(collate, NumpyBatchCollateFn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        batches = list(ds.iter_torch_batches(batch_size=2, collate_fn=collate))
        with pytest.raises(DeprecationWarning):  # what a plain function gets under the same filter
            list(ds.iter_torch_batches(batch_size=2, collate_fn=lambda batch: collate(batch)))
    assert len(batches) == 2 and all(sorted(b) == ["attention_mask", "input_ids"] for b in batches)
    got_ids = torch.cat([b["input_ids"] for b in batches])
    got_mask = torch.cat([b["attention_mask"] for b in batches])
    assert got_ids.dtype == got_mask.dtype == torch.int64 and got_ids.shape == (4, 6)
    assert torch.equal(got_ids, torch.from_numpy(ids.astype(np.int64)))
    assert torch.equal(got_mask, torch.from_numpy(mask.astype(np.int64)))
