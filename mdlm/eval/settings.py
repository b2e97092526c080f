"""What an evaluation asks for: the NELBO job, generation, and the whole request, with their validation.

``EvalRequest`` is also the ``eval`` section of the config tree (``mdlm evaluate eval.nelbo.mc_samples=4``).
Errors are :class:`~mdlm.eval.EvalInputError` naming the request field (``nelbo.mc_samples``, ``gen.top_p``,
``data``...); the config tree reports them as ``eval.<field>``. Only ``mdlm.eval`` and ``mdlm.config_base`` are
imported here, so :mod:`mdlm.config` can hold these sections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mdlm.config_base import SAMPLERS
from mdlm.eval import EvalInputError

DEFAULT_MODEL = "models:/mdlm@current"  # what the main job registers
DEFAULT_RESULTS = "runs/eval/results.json"  # where `mdlm evaluate` writes the results JSON unless eval.output says


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> (name, dir)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, path
    return Path(spec.rstrip("/")).name or spec, spec


@dataclass
class NelboSettings:
    """The NELBO job: which split, how many Monte-Carlo time samples, and how it runs (the generation job runs
    on the same actor pool settings: ``num_actors``, ``device``, ``cpus_per_actor``)."""

    split: str = "test"
    mc_samples: int = 1
    max_rows: int | None = None  # the first N rows of the split (quick runs)
    batch_size: int = 16  # rows per forward pass; also the alignment of the per-actor groups
    num_actors: int = 1
    device: str = "cpu"  # 'cpu' or 'cuda' (one GPU per actor)
    cpus_per_actor: float | None = None  # None: share the cluster's CPUs (mdlm.runtime.actor_cpu_share)
    seed: int = 0
    confidence: float = 0.95

    def validate(self) -> None:
        for name in ("mc_samples", "max_rows", "batch_size", "num_actors"):
            value = getattr(self, name)
            if value is not None and value < 1:  # only max_rows may be None
                raise EvalInputError(f"nelbo.{name}", f"must be >= 1, got {value}")
        if self.device not in ("cpu", "cuda"):
            raise EvalInputError("nelbo.device", f"{self.device!r} is not 'cpu' or 'cuda'")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise EvalInputError("nelbo.cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        if not self.split.strip():
            raise EvalInputError("nelbo.split", "may not be empty")
        if not 0.0 < self.confidence < 1.0:
            raise EvalInputError("nelbo.confidence", f"must be in (0, 1), got {self.confidence}")


@dataclass
class GenSettings:
    """Generative perplexity: samples from the model, scored by an autoregressive evaluator."""

    num_samples: int = 0  # 0: skip
    evaluator: str | None = None  # AR baseline directory/URI or local Hugging Face causal-LM directory
    length: int | None = None  # None: the model's max_seq_len
    steps: int | None = None  # None: one per generated position (MDLM samplers)
    sampler: str = "cached"
    top_p: float = 1.0
    dtype: str = "float64"
    stride: int | None = None  # semi-autoregressive generation beyond max_seq_len
    seed: int = 0
    batch_size: int = 8  # samples per generation call
    evaluator_batch_size: int = 8
    evaluator_max_length: int | None = None  # None: the evaluator's context length
    evaluator_stride: int | None = None  # None: half the context

    def validate(self) -> None:
        if self.num_samples < 0:
            raise EvalInputError("gen.num_samples", f"must be >= 0, got {self.num_samples}")
        if not self.num_samples:
            return
        if not self.evaluator:
            raise EvalInputError("gen.evaluator", "required when gen.num_samples > 0 (an AR model directory or URI, "
                                 "or a local Hugging Face causal-LM directory)")
        if self.sampler not in SAMPLERS:
            raise EvalInputError("gen.sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not 0.0 < self.top_p <= 1.0:
            raise EvalInputError("gen.top_p", f"{self.top_p} is not in (0, 1]")
        if self.dtype not in ("float64", "float32"):
            raise EvalInputError("gen.dtype", f"{self.dtype!r} is not 'float64' or 'float32'")
        for name in ("length", "steps", "stride", "evaluator_max_length", "evaluator_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalInputError(f"gen.{name}", f"must be >= 1, got {value}")
        for name in ("batch_size", "evaluator_batch_size"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"gen.{name}", f"must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, object]:
        """The generation settings reported with the results."""
        return {"num_samples": self.num_samples, "length": self.length, "steps": self.steps, "sampler": self.sampler,
                "top_p": self.top_p, "dtype": self.dtype, "stride": self.stride, "seed": self.seed,
                "batch_size": self.batch_size}


@dataclass
class EvalRequest:
    """Everything an evaluation asks for (``mdlm evaluate`` takes it from the config tree's ``eval`` section)."""

    model: str = DEFAULT_MODEL
    # Prepared directories ([NAME=]DIR): the first is the model's own corpus (test_*), the others zero-shot.
    # None: `mdlm evaluate` uses the config's data.output_dir (the main job's corpus); []: generation only.
    data: list[str] | None = None
    nelbo: NelboSettings = field(default_factory=NelboSettings)
    gen: GenSettings = field(default_factory=GenSettings)
    output: str | None = None  # results JSON
    mlflow: bool = True
    run_id: str | None = None  # the training run to link to (default: found from a models:/ or runs:/ URI)
    runs_dir: str = "runs"  # local tracking store when MLFLOW_TRACKING_URI is unset (as the launcher)
    experiment: str = "mdlm-eval"  # used when no training run is known
    run_name: str | None = None

    def validate_settings(self) -> None:
        """The checks that need neither the file system nor the corpus list (the config tree runs these)."""
        if not str(self.model).strip():
            raise EvalInputError("model", "may not be empty")
        self.nelbo.validate()
        self.gen.validate()

    def validate(self) -> None:
        self.validate_settings()
        if not self.data and not self.gen.num_samples:
            raise EvalInputError("data", "nothing to evaluate (no data directory and gen.num_samples 0)")
        names = [parse_data_spec(spec)[0] for spec in self.data]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EvalInputError("data", f"two corpora are named {duplicates[0]!r}; name them with NAME=DIR")
        if self.output and Path(self.output).is_dir():
            raise EvalInputError("output", "is a directory", value=self.output)
