"""Copy stdin to stdout except Ray's native log lines: the quiet driver's stderr passes through this process.

Ray's C++ core worker writes its ERROR lines to the driver's stderr as well as to its log file
(``python-core-driver-*.log``), and no setting separates the two: ``RAY_BACKEND_LOG_LEVEL`` drops them from the
file too. Ray Data triggers one such line for every actor pool (``core_worker.cc: Actor ... has constructor
arguments in the object store``: it always ``ray.put``s the pool's arguments). :func:`mdlm.output.setup_output`
therefore runs this file as a separate process (``python -I -S``: the standard library only) between the driver's
file descriptor 2 and the real stderr when quiet. Everything else passes unchanged and at once; fatal (``F``)
lines pass too. A separate process, so that whatever the driver writes before it dies (a crash, a signal) is
still delivered: it drains the pipe and exits when the last writer closes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys

# "[2026-12-02 14:22:41,245 E 8994 8994] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] [\w./-]+:\d+: ")
PREFIX_CHARS = 64  # a held-back partial line longer than this without a match is passed on


def is_native_log_line(line: bytes) -> bool:
    """Whether ``line`` is a Ray native (C++) log line below FATAL, as the core worker writes them."""
    return NATIVE_LINE.match(line) is not None


def _could_become_native(partial: bytes) -> bool:
    """Whether a line that has not ended yet may still turn out to be a native log line."""
    if len(partial) >= PREFIX_CHARS:
        return is_native_log_line(partial)
    return partial.startswith(b"[")


def filter_stream(read_fd: int, write_fd: int, chunk: int = 65536) -> None:
    """Copy ``read_fd`` to ``write_fd`` until EOF, dropping native log lines; partial lines are written as they
    come unless they may still become one."""
    pending = b""  # the start of a line held back
    passing = False  # inside a line already (partly) written
    while True:
        data = os.read(read_fd, chunk)
        if not data:
            break
        out = []
        data = pending + data
        pending = b""
        *lines, tail = data.split(b"\n")
        for line in lines:
            if passing or not is_native_log_line(line):
                out.append(line + b"\n")
            passing = False
        if tail:
            if passing or not _could_become_native(tail):
                out.append(tail)
                passing = True
            else:
                pending = tail
        if out:
            _write_all(write_fd, b"".join(out))
    if pending and not is_native_log_line(pending):
        _write_all(write_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; its last words still pass
    with contextlib.suppress(BrokenPipeError):
        filter_stream(sys.stdin.fileno(), sys.stdout.fileno())
