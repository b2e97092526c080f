"""The training progress line: step of max_steps, loss, learning rate, throughput, MFU, time left."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable


def eta_seconds(elapsed_s: float, steps_done: int, steps_left: int) -> float | None:
    """Time left at the mean pace so far: ``elapsed_s / steps_done * steps_left``; None before any step."""
    if steps_done <= 0:
        return None
    return elapsed_s / steps_done * max(steps_left, 0)


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (days as ``N days, H:MM:SS``), rounded to the second; ``-`` when unknown."""
    if seconds is None:
        return "-"
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressClock:
    """The pace of this run's optimizer steps, from the end of its first step (which also pays start-up: the
    data pipeline's first blocks, compilation), so a resumed run measures only its own steps."""

    def __init__(self, max_steps: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_steps, self._clock = max_steps, clock
        self._first: tuple[int, float] | None = None

    def eta(self, step: int) -> float | None:
        """Seconds left after optimizer step ``step`` (call once per step, after it); None until a pace is known."""
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
            return None
        first_step, first_time = self._first
        return eta_seconds(now - first_time, step - first_step, self.max_steps - step)


def progress_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, mfu: float,
                  eta_s: float | None) -> str:
    """``step 20/300  loss 5.4622  lr 7.00e-04  2,599 tok/s  mfu 0.007  eta 0:02:10``."""
    width = len(str(max_steps))
    return (f"step {step:>{width}}/{max_steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
            f"mfu {mfu:.3f}  eta {format_duration(eta_s)}")
