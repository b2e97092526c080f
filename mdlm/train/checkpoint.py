"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): save, find, restore, and the
unsharded weights for the export.

A checkpoint directory holds DCP's files (one data file per rank plus ``.metadata``, loadable with a
different number of ranks) for the model, optimizer and EMA, and ``train_state.json`` (step, data position,
scheduler, RNG seeds, config), written last by rank 0: a directory without it is partial and is skipped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mdlm.storage import absolute
from mdlm.train.ema import EMA

logger = logging.getLogger(__name__)
STATE_FILE = "train_state.json"


@dataclass
class TrainProgress:
    """Where training stands; saved next to the tensors."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the global stream consumed in the current epoch (all ranks)
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None, progress: TrainProgress,
                    config: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it with its own (or a shared) ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    dcp.save(state, checkpoint_id=str(path))
    if _rank() == 0:
        meta = {"progress": asdict(progress), "scheduler": scheduler.state_dict(),
                "ema_num_updates": ema.num_updates if ema is not None else None, "config": config}
        tmp = path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        tmp.rename(path / STATE_FILE)
    return path


def is_complete(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return (path / STATE_FILE).is_file() and (path / ".metadata").is_file()


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, ema: EMA | None) -> TrainProgress:
    """Collective: restore in place (resharding to the current world size) and return the progress."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete mdlm checkpoint (missing {STATE_FILE} or .metadata)")
    meta = json.loads((path / STATE_FILE).read_text())
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if ema is not None:
        with torch.no_grad():
            for name, value in state["ema"].items():
                ema.shadow[name].copy_(value)
        ema.num_updates = int(meta["ema_num_updates"] or 0)
    return TrainProgress(**meta["progress"])


def full_state_dict(model: torch.nn.Module, ema: EMA | None = None) -> dict[str, torch.Tensor]:
    """Collective: the unsharded weights on CPU (the EMA's if given), complete on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if ema is None:
        return state
    out = {}
    for name, value in ema.shadow.items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().to("cpu", state[name].dtype if name in state else full.dtype)
    return {**state, **out}


def checkpoint_candidates(latest: Any, resume_from: str | None) -> list[Any]:
    """Ray ``Checkpoint``s to try, newest first: Ray's latest, the run's older ones beside it, then
    ``resume_from``. Listed through the checkpoint's own pyarrow filesystem, so a run on s3:// or gs:// storage
    finds them too."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    candidates = []
    if latest is not None:
        candidates.append(latest)
        parent = posixpath.dirname(latest.path.rstrip("/"))
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != latest.path.rstrip("/")),
                       reverse=True)
        candidates.extend(Checkpoint(path, filesystem=latest.filesystem) for path in older)
    if resume_from:
        candidates.append(Checkpoint(absolute(resume_from)))
    return candidates


def restore_checkpoint(candidates: list[Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None
                       ) -> tuple[TrainProgress, str | None]:
    """Collective: load the first complete candidate that loads; incomplete ones are skipped, a failed load
    falls back to the next. (fresh progress, None) when there is none; an error when complete ones exist but
    none loads (starting over would rotate them away, and a failed load may have changed the model in place)."""
    failures = []
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as path:
                if not is_complete(path):
                    logger.warning(f"skipping incomplete checkpoint {checkpoint.path}")
                    continue
                return load_checkpoint(path, model, optimizer, scheduler, ema), checkpoint.path
        except (Exception, dcp.CheckpointException) as exc:  # DCP raises CheckpointException, a BaseException
            logger.warning(f"checkpoint {checkpoint.path} could not be loaded ({exc}); trying an older one")
            failures.append(f"{checkpoint.path}: {type(exc).__name__}")
    if failures:
        raise RuntimeError("no checkpoint could be loaded (delete the broken ones, or start over with a new "
                           "run.name):\n  " + "\n  ".join(failures))
    return TrainProgress(), None
