"""MLflow tracking for training runs: one MLflow run per training run, continued on resume.

The tracking URI comes from ``MLFLOW_TRACKING_URI``, else a local sqlite database under the runs folder,
with an experiment whose ``artifact_location`` is set explicitly (never Ray's temporary folders).
Metrics are buffered on rank 0 and written when a checkpoint is saved, and the run's ``mdlm.metrics_through_step``
tag records the last step written. After a crash the run resumes from the latest committed checkpoint, which can
be older than the last flush (a node lost while its checkpoint was being committed); the restarted worker group
reads the tag and does not log the steps it recomputes up to it, so no step is ever logged twice. A tracking
server that does not answer at a checkpoint does not stop training: the metrics stay buffered (one warning says
so) and are written at the next checkpoint it answers; the last flush waits up to ``FINAL_FLUSH_WAIT_S`` for it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "mdlm.run_name"
STOPPED_TAG = "mdlm.stopped"  # why a run stopped early (e.g. a non-finite loss), read by the driver
STORAGE_TAG = "mdlm.storage_path"
LOGGED_THROUGH_TAG = "mdlm.metrics_through_step"  # the last training step whose metrics the run holds
FLUSH_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # a flush tries briefly (MLflow's default: ~2 minutes)
FINAL_FLUSH_WAIT_S = 300.0
# MLflow error codes of a request the server answered and refused (a deleted or unknown run, no permission):
# sending the same metrics again cannot succeed, unlike an outage.
REFUSALS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
                      "UNAUTHENTICATED", "BAD_REQUEST"})

logger = logging.getLogger(__name__)


@contextmanager
def fluent_tracking_uri(uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``models:/`` downloads) against ``uri`` for the block (None:
    unchanged), then exactly the state before: ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``
    into the environment, so both are put back, "unset" included (library calls leave no global behind)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if uri is not None:
            mlflow.set_tracking_uri(before)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def default_tracking_uri(runs_dir: str | os.PathLike[str]) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(runs_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | os.PathLike[str] | None) -> str:
    """The experiment id, creating the experiment (with an explicit artifact location) if needed."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if artifact_root is not None:
        location = str(artifact_root)
        if "://" not in location:
            location = Path(location).absolute().as_uri()
    return client.create_experiment(name, artifact_location=location)


def find_or_create_run(tracking_uri: str, experiment_id: str, run_name: str, storage_path: str,
                       params: dict[str, Any]) -> tuple[str, bool]:
    """(run_id, resumed): reuse the run of an earlier attempt with the same name and storage, else create."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage_path}'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id, True
    return create_run(tracking_uri, experiment_id, run_name, params, {STORAGE_TAG: storage_path}), False


def create_run(tracking_uri: str, experiment_id: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str] | None = None) -> str:
    """A new run named ``run_name`` with ``params`` (values cut to MLflow's 6,000 characters) and ``tags``."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


class MetricBuffer:
    """Rank-0 metrics, held until the next checkpoint, then logged with their steps and the times they were
    measured (not the time of the flush). What the tracking server did not take stays for the next flush.

    ``logged_through``: steps up to it are already in the run (see :func:`logged_through`) and are dropped.
    ``track_steps``: each flush records its last step in the run's ``LOGGED_THROUGH_TAG`` (training runs)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, logged_through: int = 0,
                 track_steps: bool = False) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.logged_through = logged_through
        self.track_steps = track_steps
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # (step, timestamp in ms, metrics)
        self._unsent: list[Any] = []  # mlflow Metric entities a failed flush left
        self._sent_through = logged_through  # the last step sent to the server
        self._tagged_through = logged_through  # the last step the run's tag says
        self.outage = False  # the last flush failed (warned once per outage)
        self.refused = False  # the server refused the metrics (see flush): nothing more is sent

    def add(self, step: int, metrics: dict[str, float], timestamp_ms: int | None = None) -> None:
        if self.logged_through > 0 and step <= self.logged_through:  # a restarted group recomputing them
            return
        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self.pending.append((step, stamp, {k: float(v) for k, v in metrics.items()}))

    def flush(self, wait_s: float = 0.0) -> bool:
        """Log everything buffered; True when nothing is left. A failure keeps what was not logged, warns once
        per outage and returns False, retrying for ``wait_s`` first (the last flush of a run). A refusal
        (``REFUSALS``: e.g. the run was deleted) drops the metrics with one error and stops logging for good:
        training goes on."""
        if self.run_id is None or self.refused:
            self.pending.clear()
            return self.run_id is None
        from mlflow.entities import Metric

        self._unsent += [Metric(k, v, stamp, step) for step, stamp, metrics in self.pending for k, v in metrics.items()]
        self.pending.clear()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._send()
            except Exception as exc:  # unreachable, timing out or failing server: keep the metrics
                code = getattr(exc, "error_code", None)
                if code in REFUSALS:
                    logger.error(f"MLflow tracking at {self.tracking_uri} refused the metrics of run {self.run_id} "
                                 f"({code}: {str(exc)[:200]}); training goes on, {len(self._unsent)} values and "
                                 "all later ones are not logged")
                    self._unsent.clear()
                    self.refused = True
                    return False
                if time.monotonic() < deadline:
                    time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                    continue
                if not self.outage:
                    logger.warning(f"MLflow tracking at {self.tracking_uri} did not take the metrics "
                                   f"({type(exc).__name__}: {str(exc)[:200]}); training goes on and they are "
                                   f"kept for the next checkpoint ({len(self._unsent)} values so far)")
                self.outage = True
                return False
            if self.outage:
                logger.info(f"MLflow tracking at {self.tracking_uri} answers again: the kept metrics are written")
            self.outage = False
            return True

    def _send(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        with _env(FLUSH_RETRIES):
            while self._unsent:
                batch = self._unsent[:1000]
                client.log_batch(self.run_id, metrics=batch)
                del self._unsent[:1000]  # a batch the server took is never sent again
                self._sent_through = max([self._sent_through, *(m.step for m in batch)])
            if self.track_steps and self._sent_through > self._tagged_through:
                client.set_tag(self.run_id, LOGGED_THROUGH_TAG, str(self._sent_through))
                self._tagged_through = self._sent_through


def logged_through(tracking_uri: str | None, run_id: str | None) -> int:
    """The last training step whose metrics run ``run_id`` holds (its ``LOGGED_THROUGH_TAG``; 0 for a new run).
    A tracking server that does not answer gives 0, with a warning: steps may then be logged twice."""
    if run_id is None:
        return 0
    try:
        with _env(FLUSH_RETRIES):
            value = get_tag(tracking_uri, run_id, LOGGED_THROUGH_TAG)
    except Exception as exc:  # training goes on without it
        logger.warning(f"MLflow tracking at {tracking_uri} did not answer ({type(exc).__name__}); steps recomputed "
                       "after this restart may be logged twice")
        return 0
    return int(value) if value else 0


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (those the user set win)."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if saved[k] is None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@contextmanager
def system_metrics(tracking_uri: str | None, run_id: str | None) -> Iterator[None]:
    """Log CPU/GPU/memory system metrics to the run while the block runs (rank 0 only)."""
    if run_id is None:
        yield
        return
    import mlflow

    with fluent_tracking_uri(tracking_uri):
        try:
            with _env(FLUSH_RETRIES):
                mlflow.start_run(run_id=run_id, log_system_metrics=True)
        except Exception as exc:  # the tracking server does not answer: train without system metrics
            logger.warning(f"MLflow tracking at {tracking_uri} did not answer ({type(exc).__name__}); this worker "
                           "group logs no system metrics")
            yield
            return
        status = "FAILED"  # as mlflow.start_run's own context manager marks a run the block failed in
        try:
            yield
            status = "FINISHED"
        finally:
            try:
                with _env(FLUSH_RETRIES):
                    mlflow.end_run(status)
            except Exception as exc:
                logger.warning(f"MLflow tracking at {tracking_uri}: ending the system-metrics monitor failed "
                               f"({type(exc).__name__}); the driver finishes the run")


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str) -> str:
    """Upload a folder; return its artifact URI."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"


def register_model(tracking_uri: str, run_id: str, source_uri: str, name: str, alias: str) -> str:
    """Register the exported model directory as a new version of ``name`` and point ``alias`` at it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    version = client.create_model_version(name, source=source_uri, run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def log_dataset(tracking_uri: str, run_id: str, name: str, location: str, digest: str,
                context: str = "training") -> None:
    """Record the prepared dataset at ``location`` as the run's input (MLflow's Datasets panel), with the
    manifest fingerprint as its digest: runs on the same data show the same digest."""
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow registers its local artifact source twice and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(location if "://" in location else str(Path(location).absolute()))
    dataset = MetaDataset(source=source, name=name, digest=digest)._to_mlflow_entity()
    MlflowClient(tracking_uri).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def set_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_tag(run_id, key, value)


def get_tag(tracking_uri: str, run_id: str, key: str) -> str | None:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).data.tags.get(key)
