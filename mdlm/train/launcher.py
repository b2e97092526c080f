"""The driver side of a training run: data, MLflow run, Ray Train ``TorchTrainer``, summary.

``train(config)`` joins the Ray cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``; ``auto`` joins
one started with ``ray start``), else starts a local one; prepares the default corpus if its manifest is
missing; creates or continues the MLflow run; runs ``train_loop_per_worker`` on ``run.num_workers`` workers;
draws the run's metric history as ``plots/training_curves.png`` on it; and returns where to look.
Resubmitting the same ``run.name`` with the same ``run.storage_path`` resumes from the latest checkpoint. Its
stages, and the workers' progress lines (:mod:`mdlm.train.console`), are logged to
``logging.getLogger("mdlm.train.launcher")`` / ``"mdlm.train.loop"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mdlm import output, tracking
from mdlm.config import DIFFUSION_KINDS, Config, ConfigError, RunConfig
from mdlm.data.reader import ParquetRows
from mdlm.data.sources import DEFAULT_CORPUS
from mdlm.runtime import init_ray, ray_working_dir_copy
from mdlm.storage import absolute, is_url, join
from mdlm.train.spec import WorkerSpec

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped without a usable result (the message says why; ``ray_logs``: where the workers' logs are,
    when they ran)."""

    def __init__(self, message: str, ray_logs: str | None = None) -> None:
        super().__init__(message)
        self.ray_logs = ray_logs


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str | None
    tracking_uri: str
    export_dir: str
    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    ray_logs: str | None = None  # this node's Ray session logs (workers' output, Ray Train, Ray Data)


def _runs_root(config: Config) -> Path:
    """Local folder for the sqlite tracking store and artifacts: the parent of a local storage path."""
    storage = config.run.storage_path
    return Path(storage).absolute().parent if not is_url(storage) else Path("runs").absolute()


def artifact_root(config: Config) -> str:
    """Where a new MLflow experiment keeps its artifacts: beside the checkpoints when ``run.storage_path`` is an
    object-store URL (``<storage_path>/mlartifacts``), else ``runs/mlartifacts`` beside the local store."""
    if is_url(config.run.storage_path):
        return join(absolute(config.run.storage_path), "mlartifacts")
    return str(_runs_root(config) / "mlartifacts")


@contextlib.contextmanager
def local_model_dir(export_dir: str) -> Iterator[Path]:
    """The exported model as a local folder: itself, or (a URL) a temporary copy downloaded from it."""
    if not is_url(export_dir):
        yield Path(export_dir)
        return
    from mdlm.storage import filesystem

    fs, where = filesystem(export_dir)
    with tempfile.TemporaryDirectory(prefix="mdlm-export-") as tmp:
        if fs.exists(f"{where.rstrip('/')}/config.json"):
            fs.get(f"{where.rstrip('/')}/", f"{tmp}/model/", recursive=True)
        yield Path(tmp) / "model"


def load_data(config: Config):
    """The manifest of the prepared data; the default corpus is prepared on first use."""
    from mdlm.data.manifest import load_manifest

    manifest_dir = config.data.output_dir  # a local directory or a URL
    command = (f"python pipelines/prepare_data.py data.source={config.data.source} "
               f"data.output_dir={config.data.output_dir} data.tokenizer={config.data.tokenizer} "
               f"data.block_size={config.data.block_size} data.packing={config.data.packing}")
    try:
        manifest = load_manifest(manifest_dir)
    except ValueError as exc:  # a malformed manifest
        raise TrainingError(f"{exc}\nprepare the data again with:\n  {command} --force") from None
    except FileNotFoundError:
        if config.data.source != DEFAULT_CORPUS:
            raise TrainingError(f"no prepared data at {manifest_dir}; prepare it first with:\n  {command}") from None
    else:
        wanted = {"block_size": config.data.block_size, "packing": config.data.packing,
                  "tokenizer": config.data.tokenizer}
        found = {key: getattr(manifest, key) for key in wanted}
        if found != wanted:
            raise TrainingError(f"the data at {manifest_dir} was prepared with {found}, but the config asks for "
                                f"{wanted}; prepare it again (or point data.output_dir elsewhere):\n"
                                f"  {command} --force")
        return manifest
    logger.info(f"preparing the default corpus into {manifest_dir} (first run only)")
    from mdlm.data.pipeline import prepare_dataset

    try:
        return prepare_dataset(config.data)
    except ValueError as exc:  # DataError / ConfigError: bad input, nothing was written
        raise TrainingError(str(exc)) from None


def registered_model_name(config: Config) -> str | None:
    """The MLflow registered model the export goes to ('auto': ``mdlm``, ``mdlm-ar``, ``mdlm-sedd``,
    ``mdlm-d3pm``): a baseline never moves the MDLM's alias."""
    name = config.run.registered_model
    if name == "auto":
        return "mdlm" if config.model.kind == "mdlm" else f"mdlm-{config.model.kind}"
    return name


def outputs_inside(config: Config, folder: str | Path) -> dict[str, str]:
    """The run's local outputs that land inside ``folder`` (relative paths resolve against the current
    directory), as {what: absolute path}: the Ray storage, the local MLflow store (when ``MLFLOW_TRACKING_URI``
    is unset), the prepared data and an explicit export directory."""
    run = config.run
    local = {"run.storage_path": run.storage_path, "data.output_dir": config.data.output_dir,
             "run.export_dir": run.export_dir}
    found = {what: absolute(path) for what, path in local.items() if path and not is_url(path)}
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        found["the MLflow store (MLFLOW_TRACKING_URI is unset)"] = str(_runs_root(config) / "mlflow.db")
    folder = Path(folder).absolute()
    return {what: path for what, path in found.items() if Path(path).is_relative_to(folder)}


def working_dir_warning(config: Config) -> str | None:
    """Under ``ray job submit --working-dir``, the driver runs in Ray's temporary copy of that folder
    (:func:`mdlm.runtime.ray_working_dir_copy`): a warning naming the outputs that would be written inside it
    and how to keep them; None when not in such a copy or when every output is elsewhere."""
    copy = ray_working_dir_copy()
    inside = outputs_inside(config, copy) if copy is not None else {}
    if not inside:
        return None
    listed = "".join(f"\n  {what}: {path}" for what, path in inside.items())
    return (f"this job runs in Ray's temporary copy of its --working-dir, {copy}; Ray may delete it and a "
            f"resubmission may unpack into another one (no resume), yet these outputs would be written inside "
            f"it:{listed}\nTo keep them, give absolute paths: run.storage_path=/abs/runs/ray (the MLflow store "
            f"then goes beside it, in /abs/runs) and data.output_dir=/abs/data/...; or set MLFLOW_TRACKING_URI in "
            f"the job's environment (ray job submit --runtime-env-json '{{\"env_vars\": "
            f"{{\"MLFLOW_TRACKING_URI\": ...}}}}').")


def train(config: Config) -> TrainResult:
    """Run (or resume) a distributed training run described by ``config``."""
    config.validate()
    warning = working_dir_warning(config)
    if warning:
        logger.warning(warning)
    run = config.run
    if run.use_gpu and config.training.precision != "bf16":
        logger.info("note: training on GPU in fp32; set training.precision=bf16 for mixed precision")
    init_ray()
    manifest = load_data(config)
    data = manifest.data_spec()
    if config.model.kind in DIFFUSION_KINDS and data.mask_token_id is None:
        raise TrainingError("the prepared data has no [MASK] token id")

    storage = absolute(run.storage_path)
    runs_root = _runs_root(config)
    tracking_uri = tracking.default_tracking_uri(runs_root)
    experiment_id = tracking.ensure_experiment(tracking_uri, run.mlflow_experiment, artifact_root(config))
    run_id, resumed = tracking.find_or_create_run(tracking_uri, experiment_id, run.name, storage, config.flat())
    logger.info(f"MLflow run {run_id} ({'continued' if resumed else 'new'}) in {tracking_uri}")
    if not resumed:
        _log_run_files(tracking_uri, run_id, config, manifest)

    spec = WorkerSpec(config=config, data=data, export_dir=run.export_dir or join(storage, run.name, "model"),
                      has_validation=manifest.rows("validation") > 0, tracking_uri=tracking_uri,
                      mlflow_run_id=run_id)
    # Every worker reads the prepared shards itself (the stream is not split); validation: the first rows only.
    datasets = {"train": ParquetRows(tuple(manifest.split_files("train")))}
    if spec.has_validation:
        datasets["validation"] = ParquetRows(tuple(manifest.split_files("validation")),
                                             limit=run.eval_batches * config.training.micro_batch_size)
    training = config.training
    workers = f"{run.min_workers}-{run.num_workers} (elastic)" if run.is_elastic else run.num_workers
    logger.info(f"training on {workers} Ray Train workers ({_worker_resources(run)}) for "
                f"{training.max_steps} steps of {training.global_batch_size} x {data.block_size} tokens")
    try:
        result = fit(spec, datasets)
    except Exception as exc:
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise TrainingError(f"training failed: {exc}", output.ray_logs_dir()) from exc
    metrics = dict(result.metrics or {})
    from mdlm.figures import log_training_curves

    log_training_curves(tracking_uri, run_id, title=run.name)  # a failure to draw is a warning, never an error
    stopped = metrics.get("stopped") or tracking.get_tag(tracking_uri, run_id, tracking.STOPPED_TAG)
    if stopped:
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        checkpoint = result.checkpoint.path if result.checkpoint else None
        raise TrainingError(f"training stopped: {stopped}; the last good checkpoint is {checkpoint}",
                            output.ray_logs_dir())
    out = TrainResult(run_name=run.name, mlflow_run_id=run_id, tracking_uri=tracking_uri, export_dir=spec.export_dir,
                      checkpoint=result.checkpoint.path if result.checkpoint else None, metrics=metrics,
                      ray_logs=output.ray_logs_dir())
    with local_model_dir(spec.export_dir) as exported:  # an export to a URL: registered from a local copy
        if Path(exported, "config.json").is_file():
            logger.info(f"exported the model to {spec.export_dir}")
            register_export(config, tracking_uri, run_id, str(exported), metrics=metrics)
            out.samples = _samples(config, str(exported))
            _log_text(tracking_uri, run_id, "samples.txt", "\n\n---\n\n".join(out.samples))
    tracking.finish_run(tracking_uri, run_id)
    return out


def register_export(config: Config, tracking_uri: str, run_id: str, export_dir: str,
                    metrics: dict[str, float] | None = None) -> str | None:
    """Log the exported model directory as the run's MLflow pyfunc model ``model`` (a LoggedModel carrying the
    run's final ``metrics``) and, unless ``run.registered_model`` is null, register it with ``run.model_alias``;
    returns the version."""
    from mdlm.mlflow_model import log_pyfunc_model

    name = registered_model_name(config)
    final = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    logged = log_pyfunc_model(tracking_uri, run_id, export_dir, sampling=asdict(config.sampling), metrics=final,
                              registered_name=name, alias=config.run.model_alias)
    if not name:
        logger.info(f"logged the MLflow model {logged['model_uri']}")
        return None
    logger.info(f"registered models:/{name}@{config.run.model_alias} (version {logged['version']})")
    return logged["version"]


def fit(spec: WorkerSpec, datasets: dict[str, Any]):
    """Run ``train_loop_per_worker(spec)`` under a Ray Train ``TorchTrainer``; return Ray's ``Result``. Rank 0's
    log records are logged here as they come (:func:`mdlm.train.console.relay`).

    ``datasets``: ``train`` (and ``validation``) as :class:`ParquetRows`, which every worker reads itself, or as
    Ray Datasets (in-memory data of benchmarks and tests), handed to Ray Train unsplit. An elastic worker group
    (``run.min_workers``) takes ParquetRows only: Ray Data's tasks find no CPU beside an elastic group's
    reservation (Ray 2.60)."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mdlm.train import console

    run = spec.config.run
    storage = absolute(run.storage_path)
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}
    rows = {k: v for k, v in datasets.items() if isinstance(v, ParquetRows)}
    ray_datasets = {k: v for k, v in datasets.items() if k not in rows}
    if run.is_elastic and ray_datasets:
        raise ValueError(f"run.min_workers: an elastic worker group reads ParquetRows, not Ray Datasets "
                         f"({', '.join(ray_datasets)})")
    if ray_datasets:  # step logs report progress; per-worker Ray Data progress bars would interleave with them
        ray.data.DataContext.get_current().enable_progress_bars = False
    execution = ray.data.ExecutionOptions(preserve_order=True)  # the same order on every rank
    with console.relay() as channel:
        trainer = TorchTrainer(
            train_loop_per_worker=_entry,
            train_loop_config={"spec": spec, "console": channel, "rows": rows},
            scaling_config=ScalingConfig(num_workers=(run.min_workers, run.num_workers) if run.is_elastic
                                         else run.num_workers, use_gpu=run.use_gpu,
                                         resources_per_worker=resources, placement_strategy=run.placement_strategy),
            run_config=RunConfig(name=run.name, storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=run.max_failures)),
            datasets=ray_datasets or None,
            # Not split: every rank reads the one global order and keeps its rows of each global batch
            # (mdlm.train.ingest.BatchStream), so the data order does not depend on the number of workers.
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=execution),
        )
        return trainer.fit()


def _worker_resources(run: RunConfig) -> str:
    """``0.5 CPU each, PACK``: what each Ray Train worker holds, and how they are placed."""
    return f"{run.cpus_per_worker:g} CPU{' + 1 GPU' if run.use_gpu else ''} each, {run.placement_strategy}"


def _entry(payload: dict[str, Any]) -> None:
    from mdlm.train.loop import train_loop_per_worker

    train_loop_per_worker(payload)


def _samples(config: Config, export_dir: str) -> list[str]:
    from mdlm.modeling import load_pretrained

    model = load_pretrained(export_dir)
    if model.tokenizer is None:
        return []
    s = config.sampling
    length = min(s.length or model.config.max_seq_len, model.config.max_seq_len)
    return model.generate(None, num_samples=s.num_samples, length=length, **model.sampling_kwargs(s))


def _log_run_files(tracking_uri: str, run_id: str, config: Config, manifest) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        Path(tmp, "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=1, default=str))
        tracking.log_artifacts(tracking_uri, run_id, tmp, "run")
    tracking.log_dataset(tracking_uri, run_id, str(manifest.root).rstrip("/").rsplit("/", 1)[-1], str(manifest.root),
                         manifest.fingerprint)


def _log_text(tracking_uri: str, run_id: str, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_text(text)
        tracking.log_artifacts(tracking_uri, run_id, tmp, "samples")


def mlflow_ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


__all__ = ["ConfigError", "TrainResult", "TrainingError", "fit", "mlflow_ui_command", "train"]
