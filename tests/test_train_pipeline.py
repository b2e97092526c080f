"""The main job as users run it: ``python pipelines/train.py`` on the default corpus, MLflow contents, bad input,
a NaN stop, and ``ray job submit`` against a local head node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layers=2", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16",
         "training.global_batch_size=16", "training.micro_batch_size=8", "training.log_every=2",
         "run.checkpoint_every=2", "run.eval_batches=2", "sampling.steps=8", "sampling.num_samples=2",
         "sampling.length=32", "data.max_files=2", "data.tokenizer_vocab_size=300",
         "data.validation_fraction=0.3", "data.test_fraction=0.1"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _train(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "pipelines" / "train.py"), *SMALL,
            f"run.storage_path={tmp_path / 'runs' / 'ray'}", f"data.output_dir={tmp_path / 'data'}", *overrides]
    return subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_main_job_end_to_end(tmp_path):
    out = _train(tmp_path, "training.max_steps=4", "run.name=e2e")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "data" / "manifest.json").is_file(), "the default corpus was not prepared on first use"
    model_dir = tmp_path / "runs" / "ray" / "e2e" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "--- sample 0 ---" in out.stdout and "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    run_id = out.stdout.split("MLflow run:")[1].split()[0]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.name"] == "e2e" and run.data.params["model.kind"] == "mdlm"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    assert client.get_metric_history(run_id, "val_nelbo")
    artifacts = {a.path for folder in ("run", "samples", "model") for a in client.list_artifacts(run_id, folder)}
    assert {"run/config.yaml", "run/manifest.json", "samples/samples.txt", "model/model.safetensors"} <= artifacts
    version = client.get_model_version_by_alias("mdlm", "current")
    assert version.run_id == run_id
    import mdlm

    model = mdlm.load_pretrained(model_dir)
    assert model.generate("ROMEO.\n", num_samples=1, length=24, steps=4, seed=0)[0].startswith("ROMEO.")

    # The AR baseline trains through the same script into the same experiment.
    ar = _train(tmp_path, "training.max_steps=2", "run.name=e2e-ar", "model.kind=ar", "run.registered_model=null")
    assert ar.returncode == 0, ar.stderr[-3000:]
    runs = client.search_runs([run.info.experiment_id])
    assert {r.data.params["model.kind"] for r in runs} == {"mdlm", "ar"}


def test_bad_config_and_missing_data_fail_before_training(tmp_path):
    out = _train(tmp_path, "run.num_workers=0")
    assert out.returncode == 2 and "run.num_workers" in out.stderr
    out = _train(tmp_path, "data.source=/nonexistent/corpus.txt", "training.max_steps=2")
    assert out.returncode == 1
    assert "prepare_data.py" in out.stderr and "/nonexistent/corpus.txt" in out.stderr
    assert not (tmp_path / "runs" / "ray").exists() or not any((tmp_path / "runs" / "ray").iterdir())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = _train(tmp_path, "training.max_steps=20", "run.name=nan", "run.checkpoint_every=1", "training.lr=1e30",
                 "training.grad_clip=0", "training.warmup_steps=0", "run.max_failures=0")
    assert out.returncode == 1
    assert "non-finite loss" in out.stderr
    checkpoints = sorted(p for p in (tmp_path / "runs" / "ray" / "nan").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "the last good checkpoint was not kept"
    state = json.loads((checkpoints[-1] / "train_state.json").read_text())
    assert 1 <= state["progress"]["step"] < 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tmp_path):
    env = _env(tmp_path)
    env["RAY_AUTH_MODE"] = "disabled"
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dashboard = _free_port(), _free_port()
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        job = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--",
               sys.executable, str(ROOT / "pipelines" / "train.py"), *SMALL, "training.max_steps=2",
               "run.name=submitted", f"run.storage_path={tmp_path / 'runs' / 'ray'}",
               f"data.output_dir={tmp_path / 'data'}", "run.registered_model=null"]
        out = subprocess.run(job, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout.lower()
        assert (tmp_path / "runs" / "ray" / "submitted" / "model" / "model.safetensors").is_file()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
