"""The whole evaluation: check everything that needs no Ray, run the NELBO and generation jobs, report.

    results = run_evaluation(EvalRequest(model="models:/mdlm@current", data=["data/prepared/..."]))
    results.to_dict()   # the results JSON (also written to request.output and logged to MLflow)

What it runs is logged to ``logging.getLogger("mdlm.eval.run")``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mdlm.config import KIND_SAMPLERS
from mdlm.eval import EvalInputError, report
from mdlm.eval.datasource import split_files
from mdlm.eval.inputs import Corpus, ModelInfo, check_compatible, inspect_model, open_corpus
from mdlm.eval.results import CorpusResult, EvalResults, GenResult
from mdlm.eval.settings import EvalRequest
from mdlm.storage import is_mlflow_uri
from mdlm.tracking import default_tracking_uri, fluent_tracking_uri

logger = logging.getLogger(__name__)


def prepare(request: EvalRequest) -> tuple[ModelInfo, list[Corpus], Path | None]:
    """Every check that needs no Ray: the model, the corpora and their tokenizers, the evaluator and generation
    settings. Returns the model, the corpora and the local evaluator directory (None without generation)."""
    from mdlm.eval.evaluator import evaluator_kind, resolve_evaluator_dir

    request.validate()
    model = inspect_model(request.model)  # models:/ and runs:/ resolve against tracking_uri (run_evaluation)
    corpora = [open_corpus(spec, request.nelbo.split, request.nelbo.max_rows) for spec in request.data or []]
    for corpus in corpora:
        check_compatible(model, corpus)
        split_files(corpus)  # columns and row counts of the parquet files
    gen = request.gen
    if not gen.num_samples:
        return model, corpora, None
    max_len = model.config.max_seq_len
    if model.tokenizer_file is None:
        raise EvalInputError("gen.num_samples", f"the model {model.uri} has no tokenizer.json to decode samples")
    length = gen.length or max_len
    if length > max_len and (not model.is_diffusion or gen.stride is None):
        hint = "; set gen.stride for semi-autoregressive generation" if model.is_diffusion else ""
        raise EvalInputError("gen.length", f"{length} exceeds the model's max_seq_len {max_len}{hint}")
    if gen.stride is not None and gen.stride >= max_len:
        raise EvalInputError("gen.stride", f"{gen.stride} must be below max_seq_len {max_len}")
    if model.is_diffusion and gen.sampler not in KIND_SAMPLERS[model.model_type]:
        raise EvalInputError("gen.sampler", f"{gen.sampler!r} does not apply to a {model.model_type} model; choose "
                             f"one of {', '.join(KIND_SAMPLERS[model.model_type])}")
    if not model.is_diffusion and model.config.bos_token_id is None:
        raise EvalInputError("gen.num_samples", f"the AR model {model.uri} has no bos_token_id to start from")
    evaluator_dir = resolve_evaluator_dir(str(gen.evaluator))
    evaluator_kind(evaluator_dir, gen.evaluator)
    return model, corpora, evaluator_dir


def run_evaluation(request: EvalRequest) -> EvalResults:
    """Run the whole evaluation; returns the results (also written to ``request.output`` and logged to MLflow).

    Bad input raises :class:`~mdlm.eval.EvalInputError` before anything is written or any MLflow run is
    created. ``models:/`` and ``runs:/`` URIs resolve against the tracking URI of ``request.runs_dir`` (or
    ``MLFLOW_TRACKING_URI``), set for the evaluation only."""
    uses_mlflow = request.mlflow or is_mlflow_uri(request.model) or is_mlflow_uri(request.gen.evaluator or "")
    tracking_uri = default_tracking_uri(request.runs_dir) if uses_mlflow else None  # as the training launcher
    with fluent_tracking_uri(tracking_uri):
        return _run_evaluation(request, tracking_uri)


def _run_evaluation(request: EvalRequest, tracking_uri: str | None) -> EvalResults:
    import ray

    from mdlm.eval.generation import generation_job
    from mdlm.eval.nelbo import nelbo_job
    from mdlm.eval.pool import read_dir_files
    from mdlm.runtime import init_ray

    started_at = time.perf_counter()
    model, corpora, evaluator_dir = prepare(request)
    parent = None
    if request.mlflow:
        parent = report.find_training_run(request.model, tracking_uri, request.run_id)  # type: ignore[arg-type]

    timings: dict[str, float] = {}
    corpus_results: list[CorpusResult] = []
    gen_result: GenResult | None = None
    started = init_ray()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        model_ref = ray.put(read_dir_files(model.local_dir))
        if corpora:
            logger.info(f"evaluating {', '.join(f'{c.name} ({c.rows:,} rows)' for c in corpora)}: split "
                        f"{request.nelbo.split}, K={request.nelbo.mc_samples}, {request.nelbo.num_actors} actor(s) max")
            start = time.perf_counter()
            corpus_results = nelbo_job(model_ref, corpora, request.nelbo)
            timings["nelbo"] = round(time.perf_counter() - start, 3)
        if evaluator_dir is not None:
            logger.info(f"generating {request.gen.num_samples} samples, scoring them with {request.gen.evaluator}")
            start = time.perf_counter()
            evaluator_ref = ray.put(read_dir_files(evaluator_dir))
            gen_result = generation_job(model_ref, evaluator_ref, request.gen, request.nelbo)
            timings["generation"] = round(time.perf_counter() - start, 3)
    finally:
        if started:
            ray.shutdown()

    results = EvalResults(model=model, training_run_id=parent.run_id if parent else None, nelbo=request.nelbo,
                          corpora=corpus_results, generative=gen_result,
                          seconds={**timings, "total": round(time.perf_counter() - started_at, 3)})
    if request.mlflow:
        results.mlflow = report.log_evaluation_run(results.to_dict(), tracking_uri, parent,  # type: ignore[arg-type]
                                                   request)
    if request.output:
        report.write_json_atomic(request.output, results.to_dict())
    return results
