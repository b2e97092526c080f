"""Rank 0's metric buffer against a real MLflow store: a restarted worker group that recomputes steps the run
already holds (its checkpoint was lost after the metrics were logged) logs none of them twice."""

from __future__ import annotations

import logging

import pytest

from mdlm import tracking
from tests.serve_support import free_port


@pytest.fixture()
def run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("buffer", artifact_location=str(tmp_path / "artifacts"))
    return uri, tracking.create_run(uri, experiment, "buffer", {})


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow import MlflowClient

    return [m.step for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_restart_does_not_log_the_steps_the_run_already_holds(run):
    uri, run_id = run
    assert tracking.logged_through(uri, run_id) == 0  # a new run
    first = tracking.MetricBuffer(uri, run_id, tracking.logged_through(uri, run_id), track_steps=True)
    first.add(0, {"ceiling": 1.0})  # the first worker group's step-0 value
    for step in range(1, 9):  # flushed at checkpoints 4 and 8; checkpoint 8 then never committed
        first.add(step, {"loss": 10.0 - step})
        if step % 4 == 0:
            assert first.flush()
    assert tracking.logged_through(uri, run_id) == 8
    # The restarted group resumes from checkpoint 4 and recomputes steps 5..12.
    second = tracking.MetricBuffer(uri, run_id, tracking.logged_through(uri, run_id), track_steps=True)
    for step in range(5, 13):
        second.add(step, {"loss": 10.0 - step})
    second.add(12, {"val_nelbo": 3.0})
    assert second.flush()
    assert _steps(uri, run_id) == list(range(1, 13))  # every step once
    assert _steps(uri, run_id, "val_nelbo") == [12] and _steps(uri, run_id, "ceiling") == [0]
    assert tracking.logged_through(uri, run_id) == 12


def test_without_step_tracking_the_run_gets_no_tag_and_nothing_is_dropped(run):
    uri, run_id = run
    buffer = tracking.MetricBuffer(uri, run_id)
    buffer.add(5, {"loss": 1.0})
    assert buffer.flush()
    later = tracking.MetricBuffer(uri, run_id, tracking.logged_through(uri, run_id))
    later.add(5, {"test_bound": 2.0})  # a figure added at the run's last step afterwards (bench/reproduce.py)
    assert later.flush()
    assert tracking.logged_through(uri, run_id) == 0
    assert _steps(uri, run_id, "test_bound") == [5]


def test_an_unreachable_server_gives_zero_with_a_warning(caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="mdlm.tracking"):
        assert tracking.logged_through(uri, "0" * 32) == 0
    assert any("may be logged twice" in r.getMessage() and uri in r.getMessage() for r in caplog.records)
    assert tracking.logged_through(uri, None) == 0


def test_a_refusal_drops_the_metrics_once_instead_of_retrying(run, caplog):
    from mlflow import MlflowClient

    uri, run_id = run
    buffer = tracking.MetricBuffer(uri, run_id, track_steps=True)
    buffer.add(1, {"loss": 1.0})
    assert buffer.flush()
    MlflowClient(uri).delete_run(run_id)  # the run is deleted mid-training: the store refuses its metrics
    buffer.add(2, {"loss": 0.5})
    with caplog.at_level(logging.WARNING, logger="mdlm.tracking"):
        assert buffer.flush(wait_s=60.0) is False  # refused at once, not retried for the 60 s
        buffer.add(3, {"loss": 0.25})
        assert buffer.flush() is False
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "INVALID_PARAMETER_VALUE" in errors[0] and run_id in errors[0]
    assert not [r for r in caplog.records if "did not take the metrics" in r.getMessage()]  # not an outage
    assert buffer.refused and not buffer._unsent and not buffer.pending
