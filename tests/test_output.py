"""What the pipelines print: the console handler, the stderr filter of Ray's native lines, MLflow's notices, and the
training progress line (time left from the pace so far)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mdlm import output
from mdlm.stderr_filter import filter_stream, is_native_log_line
from mdlm.train.progress import ProgressClock, eta_seconds, format_duration, progress_line

NATIVE = (b"[2026-12-02 14:22:41,245 E 8994 8994] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: "
          b"'8f97' has constructor arguments in the object store and max_restarts > 0.")


def _filtered(chunks: list[bytes]) -> bytes:
    """What filter_stream writes when ``chunks`` arrive one write at a time on a real pipe."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    worker = threading.Thread(target=filter_stream, args=(r_in, w_out))
    worker.start()
    for chunk in chunks:
        os.write(w_in, chunk)
    os.close(w_in)
    worker.join(timeout=10)
    os.close(w_out)
    out = b""
    while data := os.read(r_out, 65536):
        out += data
    os.close(r_in)
    os.close(r_out)
    return out


def test_native_log_lines_are_recognised_and_nothing_else():
    assert is_native_log_line(NATIVE)
    assert is_native_log_line(b"[2026-12-02 14:23:52,817 W 9466 9550] worker_pool.cc:1796: WARNING: 8 workers")
    assert not is_native_log_line(b"[2026-12-02 14:23:52,817 F 9466 9550] core_worker.cc:1: fatal")  # kept
    assert not is_native_log_line(b"2026-12-02 14:22:24,002\tWARNING authentication_token_setup.py:85 -- x")
    assert not is_native_log_line(b"[mdlm] step 2")
    assert not is_native_log_line(b"error: " + NATIVE)  # only at the start of a line


def test_filter_drops_native_lines_and_passes_the_rest_unchanged():
    text = [b"Traceback (most recent call last):\n", NATIVE + b"\n", b"ValueError: bad\n",
            b"[2026-12-02 14:23:52,817 F 1 1] logging.cc:1: fatal stays\n", b"[a list] stays\n", b"no newline"]
    assert _filtered(text) == b"".join(t for t in text if t != NATIVE + b"\n")
    # a native line split across writes is still dropped; a partial ordinary line passes before its end arrives
    assert _filtered([NATIVE[:30], NATIVE[30:] + b"\nafter\n"]) == b"after\n"
    assert _filtered([b"progress 1%\r", b"progress 2%\r", b"\n"]) == b"progress 1%\rprogress 2%\r\n"


def test_quiet_driver_stderr_passes_through_the_filter_process(tmp_path):
    """A driver that called setup_output(): Ray's native line is gone from its stderr, everything else arrives,
    also what it writes after setup and at exit."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, sys\nfrom mdlm.output import setup_output\nsetup_output()\n"
        f"os.write(2, {NATIVE!r} + b'\\n')\n"
        "sys.stderr.write('warned\\n')\nprint('printed')\nraise SystemExit('bye')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120, env=env)
    assert done.returncode == 1
    assert done.stdout == b"printed\n"
    assert done.stderr == b"warned\nbye\n"


def test_console_handler_prints_plain_lines(capsys):
    logger = logging.getLogger("mdlm.test_output")
    handler = output.ConsoleHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # an entry point run in-process earlier may have put a handler on "mdlm" already
    try:
        logger.info("MLflow run abc (new)")
        logger.warning("the validation split is empty")
        logger.debug("not shown")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    captured = capsys.readouterr()
    assert captured.out == "MLflow run abc (new)\n"
    assert captured.err == "warning: the validation split is empty\n"


@pytest.mark.parametrize("level, shown", [(logging.INFO, True), (logging.WARNING, False)])
def test_mlflow_notices_follow_the_mlflow_logger_level(capsys, level, shown):
    from mlflow.utils.logging_utils import eprint

    logger = logging.getLogger("mlflow")
    before = logger.level
    logger.setLevel(level)
    try:
        with output.mlflow_notices():
            eprint("Successfully registered model 'mdlm'.")
        eprint("after the block")
    finally:
        logger.setLevel(before)
    err = capsys.readouterr().err
    assert ("Successfully registered model" in err) is shown
    assert "after the block" in err


def test_eta_is_the_mean_pace_times_the_steps_left():
    assert eta_seconds(30.0, 10, 90) == pytest.approx(270.0)
    assert eta_seconds(5.0, 5, 0) == 0.0
    assert eta_seconds(1.0, 0, 10) is None
    assert format_duration(270.4) == "0:04:30" and format_duration(None) == "-"
    assert format_duration(3 * 3600 + 61) == "3:01:01"


def test_progress_clock_measures_from_the_first_step():
    times = iter([100.0, 103.0, 109.0])  # step 1 ends (start-up paid), then 3 s and 6 s per step
    clock = ProgressClock(max_steps=10, clock=lambda: next(times))
    assert clock.eta(1) is None
    assert clock.eta(2) == pytest.approx(3.0 * 8)  # 1 step in 3 s, 8 left
    assert clock.eta(3) == pytest.approx(4.5 * 7)  # 2 steps in 9 s, 7 left
    line = progress_line(20, 300, 5.46221, 7e-4, 2599.4, 0.0073, 130.2)
    assert line == "step  20/300  loss 5.4622  lr 7.00e-04  2,599 tok/s  mfu 0.007  eta 0:02:10"


def test_drop_logger_keeps_its_children_and_the_rest():
    drop = output.DropLogger(output.RAY_DATA_PROGRESS_LOGGER)

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, "message", None, None)

    assert not drop.filter(record("ray.data._internal.progress"))  # "Progress bars disabled. To enable, ..."
    assert drop.filter(record("ray.data._internal.progress.logging_progress"))
    assert drop.filter(record("ray.data._internal.execution.streaming_executor"))
