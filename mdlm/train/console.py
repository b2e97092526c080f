"""Worker output that reaches the driver once."""

from __future__ import annotations

import sys


def log_line(message: str) -> None:
    """One line to the worker's real stdout, which Ray streams to the driver. (Ray Train patches ``print`` to
    log *and*, when ``sys.stdout`` is wrapped, to print as well, so a plain print shows up twice.)"""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()
