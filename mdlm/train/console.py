"""Worker output that reaches the driver once.

Training workers log to ``logging.getLogger("mdlm")`` like the rest of the library. Rank 0's records travel to the
driver through a small Ray actor that the driver owns (:func:`relay`); the driver logs them again under the same
logger names and levels, so they print like its own lines. The other ranks' warnings stay in their Ray log files.

Why a channel and not the workers' stdout: by default the driver does not stream workers' output
(``ray.init(log_to_driver=False)``, :mod:`mdlm.output`), because Ray Train's controller and Ray Data's coordinator
print hundreds of lines there. The channel delivers the progress lines whatever ``log_to_driver`` is, exactly once
(``--verbose``, which streams the workers' output again, does not double them), without Ray's
``(RayTrainWorker pid=...)`` prefix, under ``ray job submit`` and on a multi-node cluster alike (the actor lives on
the driver's node). A worker sends each record with a blocking call, so every line logged before ``fit`` returns is
printed before the driver's next line. A rank 0 without a channel (a worker not started by
:func:`mdlm.train.launcher.fit`), or whose channel is gone, writes its lines to its real stdout, which Ray streams
to the driver when ``log_to_driver`` is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

LOGGER = "mdlm"
POLL_S = 0.5  # the driver's long poll: a line waits at most this long once logged
SEND_TIMEOUT_S = 30.0


class ConsoleChannel:
    """Ray actor (async): the records the workers put, in order, until the driver takes them."""

    def __init__(self) -> None:
        self._records: list[tuple[str, int, str]] = []
        self._ready = asyncio.Event()

    async def put(self, name: str, level: int, message: str) -> None:
        self._records.append((name, level, message))
        self._ready.set()

    async def take(self, timeout_s: float) -> list[tuple[str, int, str]]:
        """The records so far, waiting up to ``timeout_s`` for the first one."""
        if not self._records and timeout_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        records, self._records = self._records, []
        self._ready.clear()
        return records


def _write_stdout(message: str) -> None:
    # The real stdout: Ray Train patches ``print`` to log *and*, when ``sys.stdout`` is wrapped, to print as well,
    # so a plain print shows up twice.
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


class ChannelHandler(logging.Handler):
    """Worker side: each record to the driver's channel (a blocking call); to stdout if the channel is gone."""

    def __init__(self, channel: Any) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        import ray

        message = self.format(record)
        try:
            ray.get(self.channel.put.remote(record.name, record.levelno, message), timeout=SEND_TIMEOUT_S)
        except Exception:
            _write_stdout(message)


class StdoutHandler(logging.Handler):
    """Worker side without a channel: plain lines on the real stdout (streamed when ``log_to_driver`` is on)."""

    def emit(self, record: logging.LogRecord) -> None:
        _write_stdout(self.format(record))


_attached: logging.Handler | None = None


def attach(channel: Any | None, rank: int) -> None:
    """Worker: where this process's ``mdlm`` records go. Rank 0: the driver's ``channel`` (stdout without one);
    other ranks: warnings and errors to their stderr, i.e. their Ray log file."""
    global _attached
    logger = logging.getLogger(LOGGER)
    if _attached is not None:
        logger.removeHandler(_attached)
    if rank == 0:
        _attached = ChannelHandler(channel) if channel is not None else StdoutHandler()
        logger.setLevel(logging.INFO)
    else:
        _attached = logging.StreamHandler(sys.stderr)
        logger.setLevel(logging.WARNING)
    logger.addHandler(_attached)
    logger.propagate = False


@contextlib.contextmanager
def relay() -> Iterator[Any]:
    """Driver: a channel for the workers (pass it to :func:`attach`) whose records are logged here, through the
    ``mdlm`` loggers, while the block runs; drained when the block ends, then the actor is killed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    channel = ray.remote(ConsoleChannel).options(num_cpus=0, scheduling_strategy=here).remote()
    stop = threading.Event()

    def pump() -> None:
        while True:
            last = stop.is_set()
            try:
                records = ray.get(channel.take.remote(0.0 if last else POLL_S))
            except ray.exceptions.RayError:
                return
            for name, level, message in records:
                logging.getLogger(name).log(level, message)
            if last:
                return

    thread = threading.Thread(target=pump, name="mdlm-console-relay", daemon=True)
    thread.start()
    try:
        yield channel
    finally:
        stop.set()
        thread.join(timeout=SEND_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(channel)
