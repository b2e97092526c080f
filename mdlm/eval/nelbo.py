"""The perplexity bound (NELBO) job: every evaluated row of each corpus scored on a pool of model-holding actors.

The prepared splits of all corpora (the model's own, then zero-shot ones) are read in one Ray Data job by
:class:`~mdlm.eval.datasource.IndexedParquetDatasource` (blocks of exactly ``batch_size`` rows of one corpus,
aligned on multiples of ``batch_size``). ``map_batches`` sends them to a pool of :class:`NelboActor`
(``ActorPoolStrategy``; fractional CPUs on CPU so the read tasks are never starved, one GPU each on CUDA), which
load the model once and return K Monte-Carlo NELBO sums and the token count of each row (:func:`score_rows`).
Row i draws its times and masks from its own generator seeded by ``row_seed(seed, i)``, and rows are scored in
the same aligned groups whatever the pool, so the numbers do not depend on the number of actors (bit for bit),
nor on which other corpora run alongside, and, up to float rounding of batched matmuls, not on the batch size
either. The driver gathers the rows and computes :func:`~mdlm.eval.metrics.summarize_nelbo` per corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from mdlm.eval.datasource import read_indexed_splits
from mdlm.eval.inputs import Corpus
from mdlm.eval.metrics import row_generators, sequence_nll, summarize_nelbo
from mdlm.eval.pool import actor_resources, materialized, setup_torch
from mdlm.eval.results import CorpusResult
from mdlm.eval.settings import NelboSettings


def score_rows(model, input_ids: np.ndarray, attention_mask: np.ndarray | None, row_index: np.ndarray, *,
               mc_samples: int, seed: int, group_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(nll [N, K], num_tokens [N]) of rows with global indices ``row_index``: rows are scored in groups of the
    same ``row_index // group_rows`` (one forward pass each), row i drawing from ``row_seed(seed, i)``."""
    groups = np.asarray(row_index) // group_rows
    nll = np.empty((len(row_index), mc_samples), dtype=np.float64)
    tokens = np.empty(len(row_index), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(groups)) + 1
    for part in np.split(np.arange(len(row_index)), boundaries):
        if not len(part):
            continue
        ids = torch.as_tensor(input_ids[part], dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask[part], dtype=torch.long)
        values, counts = sequence_nll(model, ids, mask, mc_samples=mc_samples,
                                      generator=row_generators(seed, row_index[part]))
        nll[part], tokens[part] = values.cpu().numpy(), counts.cpu().numpy()
    return nll, tokens


def _column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<int> column of equal-length rows -> int64 [N, L]."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(column), -1)


class NelboActor:
    """Holds the model; scores batches of indexed rows (:func:`score_rows`)."""

    def __init__(self, model_files: list[ray.ObjectRef], device: str, mc_samples: int, seed: int, group_rows: int,
                 threads: int) -> None:
        from mdlm.modeling import load_pretrained

        torch_device = setup_torch(device, threads)
        with materialized(model_files[0]) as path:
            self.model = load_pretrained(path, map_location=torch_device)
        self.mc_samples, self.seed, self.group_rows = mc_samples, seed, group_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = _column_matrix(batch["input_ids"])
        mask = _column_matrix(batch["attention_mask"]) if "attention_mask" in batch.column_names else None
        corpus, index = batch["corpus"].to_numpy(), batch["row_index"].to_numpy()
        nll = np.empty((len(index), self.mc_samples), dtype=np.float64)
        tokens = np.empty(len(index), dtype=np.float64)
        for c in np.unique(corpus):
            rows = np.flatnonzero(corpus == c)
            nll[rows], tokens[rows] = score_rows(self.model, ids[rows], None if mask is None else mask[rows],
                                                 index[rows], mc_samples=self.mc_samples, seed=self.seed,
                                                 group_rows=self.group_rows)
        values = pa.FixedSizeListArray.from_arrays(pa.array(nll.ravel()), self.mc_samples)
        return pa.table({"corpus": pa.array(corpus), "row_index": pa.array(index), "nll": values,
                         "num_tokens": pa.array(tokens)})


def nelbo_job(model_ref: ray.ObjectRef, corpora: Sequence[Corpus], settings: NelboSettings) -> list[CorpusResult]:
    """NELBO (or AR NLL) of every evaluated row of each corpus, in one Ray Data job on a pool of
    :class:`NelboActor` (the model, ``model_ref`` = ``ray.put(read_dir_files(dir))``, is loaded once per actor
    for all corpora)."""
    from ray.data import ActorPoolStrategy

    blocks = sum(-(-c.rows // settings.batch_size) for c in corpora)
    actors = min(settings.num_actors, blocks)
    res = actor_resources(settings, actors)
    scored = read_indexed_splits(corpora, settings.batch_size).map_batches(
        NelboActor, batch_size=settings.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        fn_constructor_kwargs={"model_files": [model_ref], "device": res.device, "mc_samples": settings.mc_samples,
                               "seed": settings.seed, "group_rows": settings.batch_size, "threads": res.threads})
    index = [np.full(c.rows, -1, dtype=np.int64) for c in corpora]
    nll = [np.zeros((c.rows, settings.mc_samples), dtype=np.float64) for c in corpora]
    tokens = [np.zeros(c.rows, dtype=np.float64) for c in corpora]
    seen = [0] * len(corpora)
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        corpus, rows = batch["corpus"].to_numpy(), batch["row_index"].to_numpy()
        values = pc.list_flatten(batch["nll"]).to_numpy().reshape(len(rows), settings.mc_samples)
        counts = batch["num_tokens"].to_numpy()
        for c in np.unique(corpus):
            mine = corpus == c
            index[c][rows[mine]] = rows[mine]
            nll[c][rows[mine]], tokens[c][rows[mine]] = values[mine], counts[mine]
            seen[c] += int(mine.sum())
    results = []
    for c, corpus in enumerate(corpora):
        if seen[c] != corpus.rows or not np.array_equal(index[c], np.arange(corpus.rows)):
            raise RuntimeError(f"{corpus.path}: scored {seen[c]} rows, expected each of {corpus.rows} once")
        results.append(CorpusResult(name=corpus.name, data_dir=corpus.path,
                                    split=corpus.split, nll=nll[c], num_tokens=tokens[c],
                                    summary=summarize_nelbo(nll[c], tokens[c], confidence=settings.confidence),
                                    tokenizer=corpus.manifest.tokenizer))
    return results
