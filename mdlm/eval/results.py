"""The results of an evaluation, typed, and their JSON form (the results file and the MLflow artifact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mdlm.eval.inputs import ModelInfo
from mdlm.eval.metrics import NelboSummary
from mdlm.eval.settings import GenSettings, NelboSettings


@dataclass
class CorpusResult:
    """The NELBO (or AR NLL) of one corpus's evaluated rows."""

    name: str
    data_dir: str
    split: str
    summary: NelboSummary
    nll: np.ndarray  # [N, K] per-row NELBO (or NLL) sums
    num_tokens: np.ndarray  # [N]
    tokenizer: str  # the data.tokenizer spec the corpus was prepared with

    def to_dict(self, bound: bool) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "split": self.split, "tokenizer": self.tokenizer,
                "metric": "nelbo" if bound else "nll", **self.summary.to_dict()}


@dataclass
class GenResult:
    """Generative perplexity and entropy of the samples, with the samples themselves."""

    gen_ppl: float
    gen_nll: float  # evaluator NLL per scored token
    entropy: float  # mean unigram entropy of the samples (nats)
    samples: list[dict[str, Any]]
    evaluator: dict[str, Any]  # the scorer's describe()
    gen: GenSettings
    forward_passes: float  # mean model forward passes per sample batch

    def to_dict(self) -> dict[str, Any]:
        return {"gen_ppl": self.gen_ppl, "gen_nll": self.gen_nll, "entropy": self.entropy,
                "mean_forward_passes": self.forward_passes, "evaluator": self.evaluator, **self.gen.to_dict(),
                "samples": self.samples}


@dataclass
class EvalResults:
    """What :func:`~mdlm.eval.run.run_evaluation` returns; :meth:`to_dict` is the results JSON."""

    model: ModelInfo
    training_run_id: str | None
    nelbo: NelboSettings
    corpora: list[CorpusResult]  # the model's own corpus first, then the zero-shot ones
    generative: GenResult | None
    seconds: dict[str, float]  # per job, and 'total'
    mlflow: dict[str, Any] | None = None  # the evaluation run (report.log_evaluation_run), when one was logged

    def to_dict(self) -> dict[str, Any]:
        c, s = self.model.config, self.nelbo
        out = {
            "model": {"uri": self.model.uri, "local_dir": str(self.model.local_dir.absolute()),
                      "model_type": self.model.model_type, "hidden_size": c.hidden_size, "n_layers": c.n_layers,
                      "n_heads": c.n_heads, "vocab_size": c.vocab_size, "max_seq_len": c.max_seq_len,
                      "noise": self.model.noise},
            "training_run_id": self.training_run_id,
            "settings": {"split": s.split, "mc_samples": s.mc_samples, "max_rows": s.max_rows,
                         "batch_size": s.batch_size, "num_actors": s.num_actors, "device": s.device, "seed": s.seed,
                         "confidence": s.confidence},
            "corpora": {r.name: {"role": "test" if i == 0 else "zero-shot", **r.to_dict(self.model.is_diffusion)}
                        for i, r in enumerate(self.corpora)},
            "generative": self.generative.to_dict() if self.generative else None,
            "seconds": self.seconds,
        }
        if self.mlflow is not None:
            out["mlflow"] = self.mlflow
        return out
