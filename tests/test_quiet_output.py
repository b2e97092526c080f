"""The main job's console as a user sees it: by default the stages, one progress line per ``training.log_every``
from rank 0, the final metrics and where to look, nothing of Ray's or MLflow's machinery (which stays in Ray's
log files); ``--verbose`` brings Ray's output back, the progress lines still once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_pipeline import ROOT, SMALL, _env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# What the main job printed before it was made quiet (issue #14), none of which may show by default.
INTERNALS = [
    "PlacementGroupCleaner", "Failed to query Ray Train Controller", "TrainController", "RayTrainWorker",
    "Requesting resources", "Checkpoint successfully created", "Reporting training result",
    "PYTHON worker processes", "(raylet)", "core_worker.cc", "constructor arguments in the object store",
    "logging_progress", "streaming_executor", "Running Dataset", "Creating initial MLflow database tables",
    "system_metrics_monitor", "Token authentication is enabled", "Started a local Ray instance",
    "Downloading artifacts", "Successfully registered model", "Created version", "SplitCoordinator",
]
PROGRESS = re.compile(r"^step +(\d+)/(\d+)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  [\d,]+ tok/s  mfu \d+\.\d{3}  "
                      r"eta (-|\d+:\d\d:\d\d)$")


def _main_job(work: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "pipelines" / "train.py"), *SMALL,
               f"run.storage_path={work / 'runs' / 'ray'}", f"data.output_dir={work / 'data'}", *args]
    return subprocess.run(command, cwd=work, env=_env(work), capture_output=True, text=True, timeout=900)


def _without_samples(lines: list[str], run_name: str) -> list[str]:
    """The lines less the generated samples (from ``--- sample 0 ---`` to the ``run ... finished`` line)."""
    start = lines.index("--- sample 0 ---")
    end = next(i for i, line in enumerate(lines) if line.startswith(f"run {run_name} finished"))
    return lines[:start] + lines[end:]


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    work = tmp_path_factory.mktemp("quiet")
    return work, _main_job(work, "training.max_steps=6", "run.name=quiet")


def test_default_output_is_stages_progress_and_results(quiet):
    _, out = quiet
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "DeprecationWarning" not in text and "deprecated" not in text.lower()
    for internal in INTERNALS:
        assert internal not in text, internal
    lines = [line for line in _without_samples(text.splitlines(), "quiet") if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert len(lines) <= 30, "\n".join(lines)

    stdout = out.stdout.splitlines()
    for stage in ("preparing the default corpus into", "reading shakespeare: 2 files",
                  "MLflow run ", "training on 2 Ray Train workers (0.5 CPU each, PACK) for 6 steps",
                  "exported the model to ", "registered models:/mdlm@current (version 1)", "--- sample 1 ---",
                  "run quiet finished: {", "  MLflow run:   ", "  model:        ", "  checkpoint:   ",
                  "  MLflow UI:    mlflow ui --backend-store-uri sqlite:///", "  Ray logs:     "):
        assert any(line.startswith(stage) for line in stdout), stage
    progress = [PROGRESS.match(line) for line in stdout if line.startswith("step ")]
    assert all(progress) and [(int(m[1]), int(m[2])) for m in progress] == [(2, 6), (4, 6), (6, 6)]
    assert progress[-1][3] == "0:00:00"  # nothing left after the last step
    order = [next(i for i, line in enumerate(stdout) if line.startswith(s))
             for s in ("MLflow run ", "training on", "step 2/6", "step 6/6", "registered", "--- sample 0 ---")]
    assert order == sorted(order)
    finished = next(line for line in stdout if line.startswith("run quiet finished"))
    assert "'loss':" in finished and "'val_nelbo':" in finished

    # What is no longer printed is still written: Ray's logs stay in their files.
    logs = Path(next(line for line in stdout if line.startswith("  Ray logs:")).split(":", 1)[1].strip())
    written = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())
    assert "Checkpoint successfully created" in written


def test_verbose_shows_rays_output_and_the_progress_once(quiet):
    work, _ = quiet  # the data prepared by the default run
    out = _main_job(work, "training.max_steps=2", "run.name=verbose", "run.registered_model=null", "--verbose")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "(TrainController pid=" in text and "(RayTrainWorker pid=" in text
    assert "Started a local Ray instance" in text
    assert [line for line in text.splitlines() if "step 2/2" in line] == [
        next(line for line in out.stdout.splitlines() if line.startswith("step 2/2"))]  # once, from the channel
    assert "run verbose finished: {" in out.stdout
