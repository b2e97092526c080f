"""A tracking outage during training: a real ``mlflow server`` subprocess is the tracking URI and is stopped
mid-run, then started again. Training goes on with one warning, the metrics measured meanwhile are written when
the server is back, the run holds every step once and finishes."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mdlm import tracking
from mdlm.train.launcher import fit, register_export
from mdlm.train.spec import WorkerSpec
from tests.serve_support import free_port
from tests.test_train_ray import DATA, _config, _datasets

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    log_path = root / f"server-{time.monotonic_ns()}.log"
    log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        assert process.poll() is None, log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
        time.sleep(0.5)


def _stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _checkpoints(root: Path) -> int:
    return len(list((root / "ray").glob("*/checkpoint_*")))


def test_training_survives_a_tracking_server_outage(ray_local, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mdlm"), "propagate", True)  # an earlier entry point may have unset it
    caplog.set_level(logging.INFO, logger="mdlm")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    config = _config(tmp_path, "outage", "training.max_steps=14", "run.checkpoint_every=2", "training.log_every=1",
                     "run.keep_checkpoints=10")  # every checkpoint stays: the outage thread counts them
    experiment = tracking.ensure_experiment(uri, "outage", None)
    run_id, _ = tracking.find_or_create_run(uri, experiment, config.run.name, str(tmp_path), config.flat())
    spec = WorkerSpec(config=config, data=DATA, export_dir=str(tmp_path / "outage" / "model"), has_validation=True,
                      tracking_uri=uri, mlflow_run_id=run_id)
    events: dict[str, int] = {}

    def outage() -> None:
        nonlocal server
        deadline = time.monotonic() + 300
        while _checkpoints(tmp_path) < 1 and time.monotonic() < deadline:  # the first flush went to the server
            time.sleep(0.05)
        _stop_server(server)
        events["down_at"] = _checkpoints(tmp_path)
        while _checkpoints(tmp_path) < events["down_at"] + 2 and time.monotonic() < deadline:  # 2 flushes fail
            time.sleep(0.05)
        events["up_at"] = _checkpoints(tmp_path)
        server = _start_server(tmp_path, port)

    side = threading.Thread(target=outage)
    side.start()
    try:
        result = fit(spec, _datasets(ray_local))
        side.join(timeout=300)
        register_export(config, uri, run_id, spec.export_dir)
        tracking.finish_run(uri, run_id)
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        history = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        status = client.get_run(run_id).info.status
    finally:
        side.join(timeout=300)
        _stop_server(server)
    assert result.error is None and result.metrics["step"] == 14
    # the server was down across at least two checkpoints, and back before the last one (step 14)
    assert events["up_at"] >= events["down_at"] + 2 and events["up_at"] < 7
    assert history == list(range(1, 15))  # every step once, those measured during the outage included
    assert status == "FINISHED"
    warnings = [r.getMessage() for r in caplog.records if r.name == "mdlm.tracking" and r.levelname == "WARNING"
                and "did not take the metrics" in r.getMessage()]
    assert len(set(warnings)) == 1 and uri in warnings[0], warnings  # one warning for the outage
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "mdlm.tracking")
