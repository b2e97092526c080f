"""The generative-perplexity job: samples from the model, scored by an autoregressive evaluator, on a pool of
actors holding both.

The sample-batch indices 0..B-1 go to a pool of :class:`GenerateActor`: batch j draws its samples with seed
``row_seed(seed, j)``, decodes them, re-tokenizes and scores them with the evaluator (:mod:`mdlm.eval.evaluator`)
and measures each sample's unigram entropy (:func:`generate_and_score`), so the samples do not depend on the pool.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray

from mdlm.config import DIFFUSION_KINDS
from mdlm.eval.metrics import generative_perplexity, row_seed, unigram_entropy
from mdlm.eval.pool import actor_resources, materialized, setup_torch
from mdlm.eval.results import GenResult
from mdlm.eval.settings import GenSettings, NelboSettings


def generate_samples(model, num_samples: int, gen: GenSettings, seed: int):
    """Unconditional samples from ``model`` (after its BOS, as training rows start): (tokens [N, L], prefix
    length, forward passes)."""
    bos = model.config.bos_token_id
    prefix = [bos] if bos is not None else None
    kwargs: dict[str, Any] = {"top_p": gen.top_p, "dtype": gen.dtype, "prefix": prefix, "seed": seed}
    if model.model_type in DIFFUSION_KINDS:
        kwargs.update(steps=gen.steps, sampler=gen.sampler, stride=gen.stride)
    out = model.sample(num_samples, gen.length or model.config.max_seq_len, **kwargs)
    return out.tokens, len(prefix or []), out.num_forward_passes


def generate_and_score(model, scorer, batch_index: int, gen: GenSettings) -> dict[str, list]:
    """Sample batch ``batch_index`` (seed ``row_seed(gen.seed, batch_index)``), decode it, score the texts with the
    evaluator and measure each sample's unigram entropy (generated tokens only)."""
    count = min(gen.batch_size, gen.num_samples - batch_index * gen.batch_size)
    tokens, prefix, passes = generate_samples(model, count, gen, row_seed(gen.seed, batch_index))
    texts = model.decode(tokens)
    nll, scored = scorer.score_texts(texts, gen.evaluator_batch_size)
    entropies, _ = unigram_entropy(tokens[:, prefix:].cpu())
    first = batch_index * gen.batch_size
    return {"sample_index": list(range(first, first + count)), "text": texts, "nll": nll.tolist(),
            "num_tokens": scored.tolist(), "entropy": entropies, "forward_passes": [passes] * count}


class GenerateActor:
    """Holds the model and the autoregressive evaluator (named ``gen.evaluator``); turns sample-batch indices
    into scored samples."""

    def __init__(self, model_files: list[ray.ObjectRef], evaluator_files: list[ray.ObjectRef], device: str,
                 gen: GenSettings, threads: int) -> None:
        from mdlm.eval.evaluator import load_scorer
        from mdlm.modeling import load_pretrained

        torch_device = setup_torch(device, threads)
        with materialized(model_files[0]) as path:
            self.model = load_pretrained(path, map_location=torch_device)
        with materialized(evaluator_files[0]) as path:
            self.scorer = load_scorer(path, torch_device, name=str(gen.evaluator),
                                      max_length=gen.evaluator_max_length, stride=gen.evaluator_stride)
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows: dict[str, list] = {}
        for index in batch["id"]:
            for key, values in generate_and_score(self.model, self.scorer, int(index), self.gen).items():
                rows.setdefault(key, []).extend(values)
        rows["evaluator"] = [json.dumps(self.scorer.describe())] * len(rows["text"])
        return {key: np.asarray(values, dtype=object if key in ("text", "evaluator") else None)
                for key, values in rows.items()}


def generation_job(model_ref: ray.ObjectRef, evaluator_ref: ray.ObjectRef, gen: GenSettings,
                   settings: NelboSettings) -> GenResult:
    """Generative perplexity and entropy of ``gen.num_samples`` samples on a pool of :class:`GenerateActor`
    (sized and placed by the pool settings of ``settings``)."""
    from ray.data import ActorPoolStrategy

    batches = -(-gen.num_samples // gen.batch_size)
    actors = min(settings.num_actors, batches)
    res = actor_resources(settings, actors)
    # from_items: the indices are made on the driver, so no read task competes with the actors for CPUs.
    out = ray.data.from_items([{"id": i} for i in range(batches)], override_num_blocks=batches).map_batches(
        GenerateActor, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        fn_constructor_kwargs={"model_files": [model_ref], "evaluator_files": [evaluator_ref], "device": res.device,
                               "gen": gen, "threads": res.threads})
    rows = sorted(out.take_all(), key=lambda row: int(row["sample_index"]))
    if [int(r["sample_index"]) for r in rows] != list(range(gen.num_samples)):
        raise RuntimeError(f"generated {len(rows)} samples, expected {gen.num_samples}")
    samples = [{"index": int(r["sample_index"]), "text": str(r["text"]), "nll": float(r["nll"]),
                "num_tokens": int(r["num_tokens"]), "entropy": float(r["entropy"])} for r in rows]
    nll = np.array([s["nll"] for s in samples])
    counts = np.array([s["num_tokens"] for s in samples], dtype=np.float64)
    total = float(counts.sum())
    return GenResult(gen_ppl=generative_perplexity(nll, counts) if total else math.nan,
                     gen_nll=float(nll.sum() / total) if total else math.nan,
                     entropy=float(np.mean([s["entropy"] for s in samples])), samples=samples,
                     evaluator=json.loads(str(rows[0]["evaluator"])), gen=gen,
                     forward_passes=float(np.mean([int(r["forward_passes"]) for r in rows])))
