"""Model FLOPs utilisation: training FLOPs per token and the measured matmul ceiling of a device.

MFU = tokens/s x ``matmul_flops_per_token`` / ``measure_matmul_ceiling``. Only torch is imported here, so
the GPU check script and the training loop share one definition. A training run measures its ceiling once
(:func:`run_matmul_ceiling`) and keeps it in its checkpoints, so MFU keeps one denominator across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mdlm.train.collectives import all_reduce_sum, rank_and_world

CEILING_KEY = "matmul_ceiling_flops"  # in a checkpoint's saved progress (``extra``), and the MLflow metric


def matmul_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 x (matmul parameters applied to every token) + 12 x layers x width x length: training FLOPs per token.

    ``model`` is an MDLM or AR model (``.backbone``, ``.config``). Not counted: embedding tables (lookups),
    the time embedding and adaLN modulation layers (applied once per sequence to the conditioning vector, not
    per token), and output columns added by ``vocab_pad_multiple`` (no useful work).
    """
    c = model.config
    per_sequence = ("embed.", "time_embed.", "adaln.")
    matmul = sum(p.numel() for n, p in model.backbone.named_parameters()
                 if p.dim() == 2 and not any(part in n for part in per_sequence))
    matmul -= (model.backbone.final.linear.out_features - c.vocab_size) * c.hidden_size
    return 6.0 * matmul + 12.0 * c.n_layers * c.hidden_size * seq_len


def measure_matmul_ceiling(device: torch.device | str = "cpu", *, size: int | None = None,
                           dtype: torch.dtype | None = None, rounds: int = 5) -> float:
    """Dense square matmul throughput of ``device`` in FLOP/s (bf16 8192^2 on GPU, fp32 512^2 on CPU).

    The best of ``rounds`` timed rounds: a ceiling is the fastest the hardware went, and taking the best
    keeps a busy neighbour on a shared machine from lowering it (which would inflate MFU).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 512)
    a = torch.randn(n, n, device=device, dtype=dtype or (torch.bfloat16 if cuda else torch.float32))
    b = torch.randn_like(a)
    reps = 10 if cuda else 4
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * reps / best


def device_kind(device: torch.device | str) -> str:
    """What a ceiling was measured on: ``cpu``, or ``cuda:`` and the GPU's name (a resume on other hardware
    measures again)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def run_matmul_ceiling(saved: dict[str, Any], device: torch.device | str, mlflow_run_id: str | None = None,
                       **measure: Any) -> tuple[float, bool]:
    """The matmul ceiling of one device (FLOP/s) for a training run, measured once per run.

    ``saved`` is the run's saved progress (``TrainProgress.extra``, restored from its checkpoint): when it holds
    a ceiling measured on the same kind of device (:func:`device_kind`), that one is used and nothing is
    measured, so a restarted worker group (fault recovery, resume) keeps the denominator of MFU. Otherwise
    every rank measures (``measure``: :func:`measure_matmul_ceiling`'s options) and all take rank 0's value
    (collective), stored into ``saved`` for the next checkpoint. Returns (ceiling, whether it is new to
    ``mlflow_run_id``: measured now, or carried over from another run's checkpoint), i.e. whether to log it.
    """
    entry = saved.get(CEILING_KEY)
    kind = device_kind(device)
    if isinstance(entry, dict) and entry.get("device") == kind and float(entry.get("flops") or 0) > 0:
        new_to_run = entry.get("mlflow_run_id") != mlflow_run_id
        entry["mlflow_run_id"] = mlflow_run_id
        return float(entry["flops"]), new_to_run
    rank, _ = rank_and_world()
    flops = measure_matmul_ceiling(device, **measure)
    [flops] = all_reduce_sum([flops if rank == 0 else 0.0], device)
    saved[CEILING_KEY] = {"device": kind, "flops": flops, "mlflow_run_id": mlflow_run_id}
    return flops, True


class StepThroughput:
    """Tokens/s over the time spent inside training steps.

    The first step (data start-up, compilation) is reported on its own and left out of the running rate;
    whatever happens between a ``stop`` and the next ``start`` (checkpoints, evaluation) is not counted, so a
    checkpoint does not drag tokens/s and MFU down for the rest of the run.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0
        self._started: float | None = None

    def start(self) -> None:
        self._started = self.clock()

    def stop(self, tokens: int) -> float:
        """End the step that processed ``tokens`` tokens; return the current tokens/s."""
        if self._started is None:
            raise RuntimeError("StepThroughput.stop() without start()")
        elapsed, self._started = self.clock() - self._started, None
        self.steps += 1
        if self.steps == 1:
            return tokens / max(elapsed, 1e-9)
        self.seconds += elapsed
        self.tokens += tokens
        return self.tokens / max(self.seconds, 1e-9)
