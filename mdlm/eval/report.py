"""Evaluation results: the JSON file, the MLflow run linked to the training run, and the summary table.

The MLflow run is a new run in the training run's experiment, tagged ``mlflow.parentRunId`` = the training
run (the UI nests it under it), with the evaluation settings as params, the numbers as metrics, the results
JSON as the artifact ``evaluation/results.json`` and their bar chart as ``plots/evaluation.png``. The
training run is the one that logged the registered model version of a ``models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``) URI, the run of a ``runs:/ID/...`` URI, or an explicit run id. Without one, the run
goes to an experiment of its own (``mdlm-eval``) created with an explicit artifact location under the runs
folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdlm.eval import EvalInputError
from mdlm.storage import write_text_atomic
from mdlm.tracking import ensure_experiment

if TYPE_CHECKING:
    from mdlm.eval.settings import EvalRequest

PARENT_TAG = "mlflow.parentRunId"
EVALUATION_TAG = "mdlm.evaluation_of"
ARTIFACT_DIR = "evaluation"
RESULTS_NAME = "results.json"


@dataclass
class TrainingRun:
    run_id: str
    experiment_id: str
    name: str | None


def _model_version(client, uri: str):
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = rest.partition("/")
    version = version.strip("/")
    if version.isdigit():
        return client.get_model_version(name, version)
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        return max(versions, key=lambda v: int(v.version)) if versions else None
    return None  # a stage: deprecated in MLflow, no run to link


def find_training_run(model_uri: str, tracking_uri: str, run_id: str | None = None) -> TrainingRun | None:
    """The training run to link the evaluation to: ``run_id`` if given, else the run behind a ``models:/`` or
    ``runs:/`` URI, else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    if run_id is None:
        try:
            if model_uri.startswith("runs:/"):
                run_id = model_uri[len("runs:/"):].split("/", 1)[0]
            elif model_uri.startswith("models:/"):
                version = _model_version(client, model_uri)
                run_id = version.run_id if version is not None else None
        except MlflowException as exc:
            raise EvalInputError("model", str(exc).splitlines()[0], value=model_uri) from None
        if not run_id:
            return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EvalInputError("run_id", f"no such MLflow run in {tracking_uri}", value=run_id) from None
    return TrainingRun(run_id=run.info.run_id, experiment_id=run.info.experiment_id, name=run.info.run_name)


def metric_key(name: str) -> str:
    """A corpus name usable in MLflow metric keys."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def evaluation_metrics(results: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``{split}_nelbo``, ``_nelbo_se``, ``_ppl_bound`` (+ ``_low``/``_high``) for the main corpus
    (``_nll`` / ``_ppl`` for an AR model), the same under ``zeroshot/{name}/`` for the others, and ``gen_ppl``,
    ``gen_nll``, ``gen_entropy``. Non-finite values are left out."""
    out: dict[str, float | None] = {}
    for name, corpus in results.get("corpora", {}).items():
        prefix = "" if corpus["role"] == "test" else f"zeroshot/{metric_key(name)}/"
        prefix += f"{corpus['split']}_"
        metric, ppl = ("nelbo", "ppl_bound") if corpus["metric"] == "nelbo" else ("nll", "ppl")
        out.update({f"{prefix}{metric}": corpus["nelbo"], f"{prefix}{metric}_se": corpus["se"],
                    f"{prefix}{metric}_mc_se": corpus["mc_se"], f"{prefix}{ppl}": corpus["ppl"],
                    f"{prefix}{ppl}_low": corpus["ppl_low"], f"{prefix}{ppl}_high": corpus["ppl_high"],
                    f"{prefix}tokens": corpus["num_tokens"]})
    gen = results.get("generative")
    if gen:
        out.update({"gen_ppl": gen["gen_ppl"], "gen_nll": gen["gen_nll"], "gen_entropy": gen["entropy"]})
    return {key: value for key, value in ((k, _finite(v)) for k, v in out.items()) if value is not None}


def evaluation_params(results: dict[str, Any]) -> dict[str, str]:
    """MLflow params: the model, the settings, the corpora and the generation settings."""
    params = {"model": results["model"]["uri"], "model_type": results["model"]["model_type"]}
    params.update({f"eval.{k}": v for k, v in results["settings"].items()})
    params.update({f"data.{name}": f"{c['data_dir']} ({c['role']})" for name, c in results["corpora"].items()})
    gen = results.get("generative")
    if gen:
        params.update({f"gen.{k}": v for k, v in gen.items()
                       if k in ("num_samples", "length", "steps", "sampler", "top_p", "dtype", "stride", "seed")})
        params["gen.evaluator"] = gen["evaluator"]["name"]
    return {k: str(v)[:6000] for k, v in params.items()}


def to_json(data: Any) -> str:
    """JSON text; NaN and infinities become null (they are not valid JSON)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON (:func:`to_json`) through a temporary sibling file renamed into place (never half a
    file; nothing is written when ``data`` is not JSON-serialisable)."""
    return write_text_atomic(path, to_json(data))


def log_evaluation_run(results: dict[str, Any], tracking_uri: str, parent: TrainingRun | None,
                       request: EvalRequest) -> dict[str, Any]:
    """Create the evaluation run (child of ``parent`` when known), log params, metrics and the results JSON (with
    the returned run info under ``mlflow``); returns that info. A failure marks the run FAILED and re-raises."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    if parent is not None:
        experiment_id = parent.experiment_id
    else:
        experiment_id = ensure_experiment(tracking_uri, request.experiment, Path(request.runs_dir) / "mlartifacts")
    tags = {EVALUATION_TAG: request.model, "mdlm.kind": "evaluation"}
    if parent is not None:
        tags[PARENT_TAG] = parent.run_id
    run_name = request.run_name or (f"eval-{parent.name}" if parent and parent.name else "eval")
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    info = {"run_id": run_id, "experiment_id": experiment_id, "parent_run_id": parent.run_id if parent else None,
            "tracking_uri": tracking_uri, "artifact": f"{run.info.artifact_uri}/{ARTIFACT_DIR}/{RESULTS_NAME}"}
    logged = {**results, "mlflow": info}
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in evaluation_params(results).items()]
        metrics = [Metric(k, v, now, 0) for k, v in evaluation_metrics(results).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        with tempfile.TemporaryDirectory(prefix="mdlm-eval-") as tmp:
            (Path(tmp) / RESULTS_NAME).write_text(to_json(logged))
            client.log_artifact(run_id, str(Path(tmp) / RESULTS_NAME), ARTIFACT_DIR)
        from mdlm.figures import log_evaluation_figure

        log_evaluation_figure(tracking_uri, run_id, results, title=run_name)  # a warning, never an error
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return info


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}f}"


def format_summary(results: dict[str, Any]) -> str:
    """A short human-readable table of the results."""
    lines = []
    corpora = results.get("corpora") or {}
    if corpora:
        bound = next(iter(corpora.values()))["metric"] == "nelbo"
        metric, ppl = ("NELBO", "PPL bound") if bound else ("NLL", "PPL")
        width = max(len("corpus"), *(len(n) for n in corpora))
        lines.append(f"{'corpus':<{width}}  {'role':<9}  {'split':<10}  {'rows':>7}  {'tokens':>10}  "
                     f"{metric + ' +- SE (nats/token)':>24}  {ppl + ' [' + '95% CI]':>26}")
        for name, c in corpora.items():
            value = f"{_fmt(c['nelbo'])} +- {_fmt(c['se'])}"
            interval = f"{_fmt(c['ppl'], 2)} [{_fmt(c['ppl_low'], 2)}, {_fmt(c['ppl_high'], 2)}]"
            lines.append(f"{name:<{width}}  {c['role']:<9}  {c['split']:<10}  {c['num_sequences']:>7,}  "
                         f"{c['num_tokens']:>10,}  {value:>24}  {interval:>26}")
        k = next(iter(corpora.values()))["mc_samples"]
        lines.append(f"({k} Monte-Carlo time sample(s) per sequence; SE over sequences)" if bound else
                     "(exact autoregressive NLL)")
    gen = results.get("generative")
    if gen:
        lines.append(f"generative perplexity {_fmt(gen['gen_ppl'], 2)} (evaluator {gen['evaluator']['name']}), "
                     f"unigram entropy {_fmt(gen['entropy'], 3)} nats: {gen['num_samples']} samples, "
                     f"sampler {gen['sampler']}, steps {gen['steps'] or 'auto'}, top_p {gen['top_p']}")
    mlflow = results.get("mlflow")
    if mlflow:
        parent = f" (child of training run {mlflow['parent_run_id']})" if mlflow.get("parent_run_id") else ""
        lines.append(f"MLflow run {mlflow['run_id']}{parent} in {mlflow['tracking_uri']}")
    return "\n".join(lines)
