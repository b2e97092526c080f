"""What the driver hands every Ray Train worker: one typed object instead of a dict read with defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mdlm.config import Config
from mdlm.data.spec import DataSpec


@dataclass(frozen=True)
class WorkerSpec:
    config: Config  # validated by the driver
    data: DataSpec  # from the prepared data's manifest
    export_dir: str  # where rank 0 writes the final model (local path or URL)
    has_validation: bool = False  # a 'validation' dataset is passed to the trainer
    tracking_uri: str | None = None  # MLflow; None: no tracking
    mlflow_run_id: str | None = None
