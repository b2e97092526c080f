"""Starting or joining Ray, shared by the pipelines."""

from __future__ import annotations

import os

from mdlm import output


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


READ_CPUS = 0.25  # logical CPUs of a Ray Data read task: reading is light
RESERVED_CPUS = 0.5  # kept free of model/tokenizer actors so that read tasks are never starved


def actor_cpu_share(cluster_cpus: float, actors: int) -> float:
    """CPUs per actor when ``actors`` share a cluster of ``cluster_cpus``, keeping ``RESERVED_CPUS`` free for
    read tasks; between 0.05 and 1."""
    return max(0.05, min(1.0, round((cluster_cpus - RESERVED_CPUS) / actors, 2)))
