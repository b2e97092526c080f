"""The figures logged to MLflow: what each figure draws from plain data, and logging them to a real sqlite store
(a PNG under plots/; a figure that cannot be drawn is a warning, not an error)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from mdlm import figures, tracking

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _results(generative: bool = True) -> dict:
    corpora = {"test-a": {"role": "test", "metric": "nelbo", "nelbo": 3.2, "se": 0.1, "ppl": 24.5, "ppl_low": 20.1,
                          "ppl_high": 29.9, "confidence": 0.95},
               "other": {"role": "zero-shot", "metric": "nelbo", "nelbo": 4.0, "se": 0.2, "ppl": 54.6,
                         "ppl_low": 36.6, "ppl_high": 81.5, "confidence": 0.95}}
    gen = {"gen_ppl": 71.3, "gen_nll": 4.27, "entropy": 4.9, "num_samples": 5, "evaluator": {"name": "gpt2"}}
    return {"corpora": corpora, "generative": gen if generative else None}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "figures", tmp_path / "mlartifacts")
    return uri, experiment


@pytest.fixture
def warnings_of_figures(caplog, monkeypatch):
    """caplog seeing ``mdlm.figures`` (an entry point run earlier in the process may stop ``mdlm`` propagating)."""
    monkeypatch.setattr(logging.getLogger("mdlm"), "propagate", True)
    return caplog


def _error_bars(ax) -> list[float]:
    """The lower and upper ends of each bar's vertical error segment, bar after bar."""
    [bars] = [c for c in ax.containers if getattr(c, "has_yerr", False)]
    return [float(y) for segment in bars.lines[2][0].get_segments() for y in (segment[0][1], segment[1][1])]


def test_training_curves_draw_loss_validation_and_lr_against_step():
    series = {"loss": [(4, 4.0), (2, 5.0), (6, 3.5)], "val_nelbo": [(6, 3.8)], "lr": [(2, 1e-3), (4, 2e-3), (6, 2e-3)]}
    fig = figures.training_curves_figure(series, title="demo")
    loss_ax, lr_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert sorted(lines) == ["loss", "val_nelbo"]
    assert list(lines["loss"].get_xdata()) == [2, 4, 6]  # sorted by step
    assert list(lines["loss"].get_ydata()) == [5.0, 4.0, 3.5]
    assert list(lines["val_nelbo"].get_xdata()) == [6] and lines["val_nelbo"].get_marker() == "o"
    assert loss_ax.get_xlabel() == "step" and lr_ax.get_ylabel() == "learning rate"
    assert [line.get_label() for line in lr_ax.get_lines()] == ["lr"] and len(lr_ax.get_lines()[0].get_xdata()) == 3
    assert fig.get_suptitle() == "demo"


def test_training_curves_without_lr_have_one_axes_and_nothing_to_draw_is_an_error():
    fig = figures.training_curves_figure({"loss": [(1, 2.0)], "val_nll": [(1, 2.5)], "grad_norm": [(1, 0.3)]})
    [ax] = fig.axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["loss", "val_nll"]
    with pytest.raises(ValueError, match="no training curves"):
        figures.training_curves_figure({"lr": [(1, 1e-3)], "loss": []})


def test_evaluation_figure_bars_per_corpus_with_errors_and_generation_panels():
    fig = figures.evaluation_figure(_results(), title="eval-demo")
    nelbo_ax, ppl_ax, gen_ax, entropy_ax = fig.axes
    assert [t.get_text() for t in nelbo_ax.get_xticklabels()] == ["test-a", "other"]
    assert [bar.get_height() for bar in nelbo_ax.patches] == pytest.approx([3.2, 4.0])
    assert _error_bars(nelbo_ax) == pytest.approx([3.1, 3.3, 3.8, 4.2])  # nelbo -/+ se
    assert _error_bars(ppl_ax) == pytest.approx([20.1, 29.9, 36.6, 81.5])  # the perplexity interval
    assert "NELBO" in nelbo_ax.get_title() and "95% CI" in ppl_ax.get_title()
    assert [bar.get_height() for bar in gen_ax.patches] == [71.3] and "generative" in gen_ax.get_title()
    assert [bar.get_height() for bar in entropy_ax.patches] == [4.9]


def test_evaluation_figure_of_an_ar_model_without_generation_and_with_missing_values():
    results = _results(generative=False)
    for corpus in results["corpora"].values():
        corpus["metric"] = "nll"
    results["corpora"]["other"].update(nelbo=None, se=None, ppl=math.nan, ppl_low=None, ppl_high=None)
    fig = figures.evaluation_figure(results)
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("NLL")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights[0] == 3.2 and np.isnan(heights[1])
    with pytest.raises(ValueError, match="no evaluation results"):
        figures.evaluation_figure({"corpora": {}, "generative": None})


def test_training_curves_logged_from_the_runs_own_history(store, tmp_path, warnings_of_figures):
    from mlflow import MlflowClient

    uri, experiment = store
    run_id = tracking.create_run(uri, experiment, "curves", {})
    buffer = tracking.MetricBuffer(uri, run_id)
    for step in (2, 4, 6):
        buffer.add(step, {"loss": 6.0 - step / 2, "lr": 1e-3, "grad_norm": 1.0})
    buffer.add(6, {"val_nelbo": 3.5})
    buffer.flush()
    assert figures.metric_histories(uri, run_id, ("loss", "val_nelbo", "val_nll")) == {
        "loss": [(2, 5.0), (4, 4.0), (6, 3.0)], "val_nelbo": [(6, 3.5)]}
    assert figures.log_training_curves(uri, run_id, title="curves")
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == [figures.TRAINING_CURVES]
    local = client.download_artifacts(run_id, figures.TRAINING_CURVES, str(tmp_path))
    assert Path(local).read_bytes()[:8] == PNG_HEADER
    assert not warnings_of_figures.records


def test_a_figure_that_cannot_be_drawn_is_a_warning(store, warnings_of_figures):
    from mlflow import MlflowClient

    uri, experiment = store
    run_id = tracking.create_run(uri, experiment, "empty", {})  # no metrics: nothing to draw
    assert figures.log_training_curves(uri, run_id) is False
    assert figures.log_evaluation_figure(uri, run_id, {"corpora": {}}) is False
    assert MlflowClient(uri).list_artifacts(run_id, "plots") == []
    messages = [r.getMessage() for r in warnings_of_figures.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and figures.TRAINING_CURVES in messages[0] and "no training curves" in messages[0]
    assert figures.EVALUATION_RESULTS in messages[1]
