"""What the model-holding actor pools of the NELBO and generation jobs share: per-actor resources, and model
files shipped through the object store.

Model (and evaluator) files travel to the actors as ``{name: bytes}`` objects in the object store, so actors on
other nodes need no access to the driver's disk (an MLflow download lands in a driver-local temporary folder);
each actor writes them to a temporary directory only while it loads them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from mdlm.eval import EvalInputError
from mdlm.eval.settings import NelboSettings
from mdlm.runtime import actor_cpu_share, actors_that_fit, node_cpus


@dataclass
class ActorResources:
    device: str
    num_cpus: float
    num_gpus: float
    threads: int  # torch threads of a CPU actor


def actor_resources(settings: NelboSettings, actors: int) -> ActorResources:
    """Per-actor resources; fails early (instead of hanging) when the cluster cannot hold the pool."""
    cluster = ray.cluster_resources()
    if settings.device == "cuda":
        gpus = float(cluster.get("GPU", 0.0))
        if gpus < actors:
            raise EvalInputError("nelbo.device", f"{actors} actor(s) need one GPU each; the Ray cluster has {gpus:g}",
                                 value="cuda")
        per_actor = settings.cpus_per_actor or 1.0
        return ActorResources("cuda", per_actor, 1.0, max(1, int(per_actor)))
    nodes = node_cpus()
    per_actor = settings.cpus_per_actor or actor_cpu_share(nodes, actors)
    if actors_that_fit(nodes, per_actor) < actors:
        raise EvalInputError("nelbo.num_actors", f"{actors} actors x {per_actor:g} CPU do not fit, with room for "
                             f"reading, on nodes of {', '.join(f'{c:g}' for c in nodes)} CPUs; use fewer actors or "
                             "set nelbo.cpus_per_actor")
    return ActorResources("cpu", per_actor, 0.0, max(1, round(per_actor)))


def read_dir_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The regular top-level files of a model directory, by name (hidden files skipped)."""
    root = Path(path)
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


@contextlib.contextmanager
def materialized(files_ref: ray.ObjectRef) -> Iterator[Path]:
    """The files of ``files_ref`` (an object-store ref to :func:`read_dir_files`'s result) written to a temporary
    directory for as long as the block runs."""
    root = Path(tempfile.mkdtemp(prefix="mdlm-eval-model-"))
    try:
        for name, data in ray.get(files_ref).items():
            (root / name).write_bytes(data)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def setup_torch(device: str, threads: int) -> torch.device:
    """The actor's torch device (CPU actors get ``threads`` intra-op threads)."""
    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    return torch.device("cuda" if device == "cuda" else "cpu")
