"""Continuous batching at step granularity, free of Ray and HTTP.

Every generate request runs its own sampler (``MDLM.sample``) in its own thread, with :meth:`StepBatcher.session`'s
``forward`` as the backbone call. A call hands the request's ``(z_t, t)`` to the batcher and waits; a scheduler
thread runs one forward pass for all the requests that are waiting (once every running request has arrived, or
after ``wait_s``), at most ``max_rows`` rows, and hands each its logits. A request thus joins the running batch at
its next step and leaves it when its sampler returns, and requests with different lengths, steps, samplers and
seeds share forward passes: the samplers (and their equations) are the library's own, unchanged. Rows of
different lengths are padded with ``pad_id`` to the longest and kept out of attention by a key mask, so each
row's logits are those of its own sequence.

Each request draws from its own generator, so a seeded request draws the same tokens whatever else is in the
batch, as far as the forward pass gives the same logits: CPU and GPU matmul kernels round differently for
different batch shapes (differences of ~1e-6 in the logits), which can flip a draw that falls that close to a
category boundary. The service's tests check equal tokens.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

Backbone = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (z_t [B, L], t [B], key mask [B, L] | None)


@dataclass
class ShareStats:
    """What one request saw: the passes it joined and, summed over them, the rows and requests in each."""

    passes: int = 0
    rows: int = 0
    requests: int = 0
    max_requests: int = 0

    @property
    def mean_rows(self) -> float:
        return self.rows / self.passes if self.passes else 0.0

    @property
    def mean_requests(self) -> float:
        return self.requests / self.passes if self.passes else 0.0


@dataclass
class _Call:
    z: Tensor
    t: Tensor
    stats: ShareStats
    done: threading.Event = field(default_factory=threading.Event)
    logits: Tensor | None = None
    error: BaseException | None = None


@dataclass
class BatcherTotals:
    """Since start: forward passes run, rows computed, passes that mixed lengths, passes per number of requests."""

    passes: int = 0
    rows: int = 0
    mixed_length_passes: int = 0
    requests_per_pass: dict[int, int] = field(default_factory=dict)


class StepBatcher:
    """Shares forward passes between concurrently running samplers (module docstring)."""

    def __init__(self, backbone: Backbone, pad_id: int, max_rows: int = 64, wait_s: float = 0.01) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._backbone = backbone
        self.pad_id = pad_id
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.totals = BatcherTotals()
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mdlm-step-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def session(self) -> Iterator[tuple[Callable[[Tensor, Tensor], Tensor], ShareStats]]:
        """One running request: yields its backbone call (``forward(z_t, t) -> logits``) and its share stats; the
        request counts as running (a pass waits up to ``wait_s`` for it) until the block ends."""
        stats = ShareStats()
        with self._cond:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            self._running += 1
        try:
            yield (lambda z_t, t: self._forward(z_t, t, stats)), stats
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the scheduler; waiting and later calls fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _forward(self, z_t: Tensor, t: Tensor, stats: ShareStats) -> Tensor:
        if z_t.shape[0] > self.max_rows:
            raise ValueError(f"{z_t.shape[0]} rows exceed the batcher's max_rows {self.max_rows}")
        call = _Call(z_t, t, stats)
        with self._cond:
            if self._closed:
                raise RuntimeError("the step batcher is closed")
            self._pending.append(call)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.logits is not None
        return call.logits

    def _take(self) -> list[_Call] | None:
        """The next pass's calls (oldest first, at most max_rows rows); None once closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                for call in self._pending:
                    call.error = RuntimeError("the step batcher is closed")
                    call.done.set()
                self._pending.clear()
                return None
            deadline = time.monotonic() + self.wait_s
            while (len(self._pending) < self._running and sum(c.z.shape[0] for c in self._pending) < self.max_rows
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            taken, rows = [], 0
            for call in self._pending:
                if taken and rows + call.z.shape[0] > self.max_rows:
                    break
                taken.append(call)
                rows += call.z.shape[0]
            del self._pending[:len(taken)]
            return taken

    def _loop(self) -> None:
        while (calls := self._take()) is not None:
            try:
                outputs = self._run(calls)
            except BaseException as error:  # handed to every request of this pass
                for call in calls:
                    call.error = error
                    call.done.set()
                continue
            rows = sum(c.z.shape[0] for c in calls)
            for call, logits in zip(calls, outputs, strict=True):
                call.logits = logits
                call.stats.passes += 1
                call.stats.rows += rows
                call.stats.requests += len(calls)
                call.stats.max_requests = max(call.stats.max_requests, len(calls))
                call.done.set()

    def _run(self, calls: list[_Call]) -> list[Tensor]:
        """One forward pass over the rows of ``calls`` (padded to the longest, with a key mask if lengths differ)."""
        lengths = [c.z.shape[1] for c in calls]
        sizes = [c.z.shape[0] for c in calls]
        longest = max(lengths)
        with torch.inference_mode():
            t = torch.cat([c.t.reshape(-1) for c in calls])
            if len(set(lengths)) == 1:
                z, keep = torch.cat([c.z for c in calls]), None
            else:
                first = calls[0].z
                z = torch.full((sum(sizes), longest), self.pad_id, dtype=first.dtype, device=first.device)
                keep = torch.zeros((sum(sizes), longest), dtype=torch.bool, device=first.device)
                row = 0
                for call in calls:
                    n, length = call.z.shape
                    z[row:row + n, :length] = call.z
                    keep[row:row + n, :length] = True
                    row += n
            logits = self._backbone(z, t, keep)
        totals = self.totals
        totals.passes += 1
        totals.rows += sum(sizes)
        totals.mixed_length_passes += keep is not None
        totals.requests_per_pass[len(calls)] = totals.requests_per_pass.get(len(calls), 0) + 1
        parts = torch.split(logits, sizes)
        return [part[:, :length] for part, length in zip(parts, lengths, strict=True)]
