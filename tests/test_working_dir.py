"""``ray job submit --working-dir``: the driver runs in Ray's unpacked copy of the folder; the copy is detected
from the current directory (a real directory laid out as Ray lays it out) and the outputs that would land in it
are named in one warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdlm.config import load_config
from mdlm.runtime import ray_working_dir_copy
from mdlm.train.launcher import outputs_inside, working_dir_warning


@pytest.fixture
def job_copy(tmp_path, monkeypatch) -> Path:
    """A working-dir copy as Ray unpacks it (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``),
    with the repository's ``pipelines`` folder inside; MLFLOW_TRACKING_URI unset."""
    copy = tmp_path / "session_2026-12-02_10-00-00_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0f1e2d"
    (copy / "pipelines").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return copy


def test_the_copy_is_found_from_its_root_or_a_folder_inside(job_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(job_copy)
    assert ray_working_dir_copy() == job_copy
    monkeypatch.chdir(job_copy / "pipelines")
    assert ray_working_dir_copy() == job_copy
    assert ray_working_dir_copy(job_copy.parent) is None  # working_dir_files itself: no job runs there
    other = tmp_path / "runtime_resources" / "pip" / "abc"  # another runtime_env resource, not a working dir
    other.mkdir(parents=True)
    assert ray_working_dir_copy(other) is None
    assert ray_working_dir_copy(tmp_path) is None


def test_default_relative_outputs_in_the_copy_are_named_in_the_warning(job_copy, monkeypatch):
    monkeypatch.chdir(job_copy)
    config = load_config("cpu-ray", ["run.name=demo"])
    message = working_dir_warning(config)
    assert message is not None and str(job_copy) in message.splitlines()[0]
    assert f"run.storage_path: {job_copy / 'runs' / 'ray'}" in message
    assert f"data.output_dir: {job_copy / config.data.output_dir}" in message
    assert f"the MLflow store (MLFLOW_TRACKING_URI is unset): {job_copy / 'runs' / 'mlflow.db'}" in message
    assert "run.export_dir" not in message  # unset: it goes under run.storage_path
    assert "run.storage_path=/abs/runs/ray" in message and "MLFLOW_TRACKING_URI" in message.splitlines()[-1]


def test_absolute_outputs_or_a_tracking_uri_leave_nothing_to_warn_about(job_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(job_copy)
    keep = tmp_path / "shared"
    absolute = load_config("cpu-ray", [f"run.storage_path={keep / 'runs' / 'ray'}", f"data.output_dir={keep / 'data'}"])
    assert working_dir_warning(absolute) is None  # the MLflow store goes beside the storage, in shared/runs
    remote = load_config("cpu-ray", ["run.storage_path=s3://bucket/runs", f"data.output_dir={keep / 'data'}",
                                     "run.export_dir=model-out"])
    assert set(outputs_inside(remote, job_copy)) == {"run.export_dir",
                                                     "the MLflow store (MLFLOW_TRACKING_URI is unset)"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{keep / 'mlflow.db'}")
    assert set(outputs_inside(remote, job_copy)) == {"run.export_dir"}
    monkeypatch.chdir(tmp_path)  # not a working-dir copy: relative paths are the user's choice
    assert working_dir_warning(load_config("cpu-ray", [])) is None
