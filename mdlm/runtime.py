"""Starting or joining Ray, shared by the pipelines."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mdlm import output

# Where Ray unpacks a job's ``--working-dir`` (runtime_env ``working_dir``) on a node and runs the job's driver:
# <session dir>/runtime_resources/working_dir_files/_ray_pkg_<hash> (ray._private.runtime_env.working_dir).
RAY_WORKING_DIR_PARTS = ("runtime_resources", "working_dir_files")


def init_ray(num_cpus: int | None = None) -> bool:
    """Connect to ``RAY_ADDRESS`` when set (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a cluster
    started with ``ray start``), else start a new local Ray (never silently joining a cluster that ``ray start``
    left running on this machine); nothing if Ray is already initialised.
    What reaches this process's console follows :mod:`mdlm.output` (quiet: workers' output stays in Ray's log files).
    Returns whether this call started (or connected) Ray."""
    import ray

    if ray.is_initialized():
        return False
    output.quiet_ray_loggers()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **output.ray_init_options())
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 **output.ray_init_options())
    return True


def ray_working_dir_copy(cwd: str | os.PathLike[str] | None = None) -> Path | None:
    """The temporary copy of a ``--working-dir`` that Ray runs this process in (``ray job submit --working-dir .``
    unpacks it under ``.../runtime_resources/working_dir_files/_ray_pkg_<hash>`` and starts the driver there),
    when ``cwd`` (default: the current directory) is that copy or inside it; else None. Relative output paths
    resolve into it, and Ray may delete it once no job uses it (its session folder is temporary too)."""
    parts = Path(cwd if cwd is not None else os.getcwd()).absolute().parts
    first, second = RAY_WORKING_DIR_PARTS
    for i in range(len(parts) - 2):
        if parts[i] == first and parts[i + 1] == second:
            return Path(*parts[:i + 3])
    return None


READ_CPUS = 0.25  # logical CPUs of a Ray Data read task: reading is light
RESERVED_CPUS = 0.5  # kept free of model/tokenizer actors so that read tasks are never starved


def node_cpus() -> list[float]:
    """The logical CPUs of each alive node of the connected Ray cluster (nodes without CPUs included, as 0)."""
    import ray

    return [float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node.get("Alive")]


def _reserve(nodes: Sequence[float]) -> float:
    """CPUs kept free on each node: room for a read task on every node, ``RESERVED_CPUS`` in all at least."""
    return max(READ_CPUS, RESERVED_CPUS / max(1, sum(1 for c in nodes if c > 0)))


def actors_that_fit(nodes: Sequence[float], share: float) -> int:
    """How many actors of ``share`` CPUs Ray can place on nodes of ``nodes`` CPUs, each node keeping its reserve
    free. (An actor lives on one node, so the count is per node, not from the cluster's total.)"""
    reserve = _reserve(nodes)
    return sum(int((c - reserve) / share + 1e-9) for c in nodes if c - reserve >= share - 1e-9)


def actor_cpu_share(nodes: Sequence[float], actors: int) -> float:
    """CPUs per actor for ``actors`` actors on a cluster whose nodes have ``nodes`` CPUs: the largest share, in
    hundredths between 0.05 and 1, at which they all fit (:func:`actors_that_fit`), so that every node keeps room
    for read tasks; 0.05 if even that does not fit. One node of C CPUs gives min(1, (C - 0.5) / actors)."""
    for hundredths in range(100, 4, -1):
        if actors_that_fit(nodes, hundredths / 100) >= actors:
            return hundredths / 100
    return 0.05
