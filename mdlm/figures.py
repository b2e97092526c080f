"""Figures logged to MLflow: the training curves on a training run, the results on an evaluation run.

Each figure is drawn from plain data by its own function, which returns a ``matplotlib.figure.Figure`` on the
Agg canvas (matplotlib's object API: no pyplot, no global state, no display needed). :func:`log_figure` draws
and uploads one; a figure that fails to draw or upload is logged as a warning and never fails the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

TRAINING_CURVES = "plots/training_curves.png"
EVALUATION_RESULTS = "plots/evaluation.png"
LOSS_KEYS = ("loss", "val_nelbo", "val_nll")  # drawn together: the training objective and its validation value
LR_KEY = "lr"
Series = Sequence[tuple[int, float]]  # (step, value)


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _number(value: Any) -> float:
    """``value`` as a float; NaN for None or anything that is not a number (JSON turns NaN into null)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def training_curves_figure(series: Mapping[str, Series], title: str | None = None) -> Figure:
    """Training loss and validation objective against step (left), learning rate against step (right, when
    ``series`` has ``lr``). ``series`` maps metric keys to (step, value) points; a ValueError when it holds
    none of :data:`LOSS_KEYS`."""
    curves = {key: sorted(series[key]) for key in LOSS_KEYS if series.get(key)}
    if not curves:
        raise ValueError(f"no training curves to draw: none of {', '.join(LOSS_KEYS)} has points")
    lr = sorted(series.get(LR_KEY) or [])
    fig = _figure(11 if lr else 6.5, 4)
    axes = fig.subplots(1, 2 if lr else 1, squeeze=False)[0]
    loss_ax = axes[0]
    for key, points in curves.items():
        steps, values = zip(*points, strict=True)
        marker = "o" if key.startswith("val_") else None
        loss_ax.plot(steps, values, label=key, marker=marker, markersize=4)
    loss_ax.set(xlabel="step", ylabel="nats per token", title="loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    if lr:
        steps, values = zip(*lr, strict=True)
        axes[1].plot(steps, values, label=LR_KEY, color="tab:gray")
        axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
        axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def evaluation_figure(results: Mapping[str, Any], title: str | None = None) -> Figure:
    """Bars per corpus of the results JSON (:meth:`mdlm.eval.results.EvalResults.to_dict`): the NELBO (or NLL)
    with +-1 standard error, the perplexity (bound) with its confidence interval, then the generative perplexity
    and the sample entropy when the results have them. A ValueError when there is nothing to draw."""
    corpora = results.get("corpora") or {}
    gen = results.get("generative") or None
    if not corpora and not gen:
        raise ValueError("no evaluation results to draw: no corpora and no generative results")
    panels = (2 if corpora else 0) + (2 if gen else 0)
    fig = _figure(3.4 * panels + 0.6, 4)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if corpora:
        _corpus_panels(axes.pop(0), axes.pop(0), corpora)
    if gen:
        _single_bar(axes.pop(0), "generative perplexity", _number(gen.get("gen_ppl")),
                    (gen.get("evaluator") or {}).get("name", "evaluator"))
        _single_bar(axes.pop(0), "unigram entropy (nats)", _number(gen.get("entropy")),
                    f"{gen.get('num_samples', '?')} samples")
    if title:
        fig.suptitle(title)
    return fig


def _corpus_panels(value_ax, ppl_ax, corpora: Mapping[str, Mapping[str, Any]]) -> None:
    """The per-corpus NELBO (NLL) bars with SE error bars, and the perplexity bars with their intervals."""
    names, rows = list(corpora), list(corpora.values())
    bound = rows[0].get("metric", "nelbo") == "nelbo"
    value_ax.bar(names, [_number(c.get("nelbo")) for c in rows], yerr=[_finite_or_zero(c.get("se")) for c in rows],
                 capsize=4, color="tab:blue")
    value_ax.set(ylabel="nats per token", title=("NELBO" if bound else "NLL") + " \u00b1 1 SE")
    below, above = zip(*(_interval(c) for c in rows), strict=True)
    ppl_ax.bar(names, [_number(c.get("ppl")) for c in rows], yerr=[below, above], capsize=4, color="tab:orange")
    confidence = _number(rows[0].get("confidence"))
    label = "CI" if math.isnan(confidence) else f"{confidence:.0%} CI"
    ppl_ax.set(ylabel="perplexity" + (" bound" if bound else ""),
               title=("PPL bound" if bound else "PPL") + f" [{label}]")
    for ax in (value_ax, ppl_ax):
        ax.grid(axis="y", alpha=0.3)


def _finite_or_zero(value: Any) -> float:
    number = _number(value)
    return number if math.isfinite(number) else 0.0


def _interval(corpus: Mapping[str, Any]) -> tuple[float, float]:
    """How far the perplexity interval reaches below and above the perplexity (0 where unknown)."""
    ppl = _number(corpus.get("ppl"))
    below = _finite_or_zero(ppl - _number(corpus.get("ppl_low")))
    above = _finite_or_zero(_number(corpus.get("ppl_high")) - ppl)
    return max(below, 0.0), max(above, 0.0)


def _single_bar(ax, title: str, value: float, label: str) -> None:
    """One labelled bar with its value written above it."""
    ax.bar([label], [value], color="tab:green")
    if not math.isnan(value):
        ax.bar_label(ax.containers[0], fmt="%.3g")
    ax.set(title=title)
    ax.grid(axis="y", alpha=0.3)


def metric_histories(tracking_uri: str | None, run_id: str, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """The logged (step, value) history of each of ``keys`` on the run (what the MLflow UI plots); keys never
    logged are left out."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    out = {}
    for key in keys:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if points:
            out[key] = points
    return out


def log_figure(tracking_uri: str | None, run_id: str, draw: Callable[[], Figure], artifact_file: str) -> bool:
    """Draw a figure and log it as ``artifact_file`` on the run; False (and a warning) if either step fails."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri).log_figure(run_id, draw(), artifact_file)
    except Exception as exc:
        logger.warning(f"could not log the figure {artifact_file} to MLflow run {run_id}: {type(exc).__name__}: "
                       f"{exc}")
        return False
    return True


def log_training_curves(tracking_uri: str | None, run_id: str, title: str | None = None) -> bool:
    """The training run's own metric history drawn as :data:`TRAINING_CURVES` on it."""
    return log_figure(tracking_uri, run_id,
                      lambda: training_curves_figure(metric_histories(tracking_uri, run_id, (*LOSS_KEYS, LR_KEY)),
                                                     title),
                      TRAINING_CURVES)


def log_evaluation_figure(tracking_uri: str | None, run_id: str, results: Mapping[str, Any],
                          title: str | None = None) -> bool:
    """The evaluation results drawn as :data:`EVALUATION_RESULTS` on the evaluation run."""
    return log_figure(tracking_uri, run_id, lambda: evaluation_figure(results, title), EVALUATION_RESULTS)
