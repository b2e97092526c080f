"""What the pipelines print, and what stays in the libraries' log files.

The library only logs, to ``logging.getLogger("mdlm")`` and its children (``mdlm.train``, ``mdlm.data`` ...), and
configures nothing. An entry point calls :func:`setup_output` once; by default (quiet) it then prints the stages,
progress and results, warnings and errors, and nothing of the machinery underneath:

- the ``mdlm`` records as plain lines: INFO on stdout, WARNING and above on stderr prefixed ``warning:`` /
  ``error:``; no timestamps;
- Ray workers' stdout and stderr (Ray Train's controller and workers, Ray Data's coordinator, ...) stay in the
  session's log files: :func:`ray_init_options` gives ``ray.init(log_to_driver=False, logging_level=WARNING)``.
  What the training workers have to say reaches the driver through :mod:`mdlm.train.console` instead, which works
  whatever ``log_to_driver`` is. Ray's error channel (dead workers, OOM kills, unschedulable requests) still
  prints, less the raylet's notice that a small node runs more worker processes than it has cores (Ray's
  ``RAY_DEDUP_LOGS_SKIP_REGEX``, read when ``ray`` is imported; the notice stays in ``raylet.out``);
- on the driver, Ray Data's console handler shows warnings and errors only, less its notices of which progress
  display is on ("Progress bars disabled ..." where a pipeline turned them off); its file handler keeps
  everything under ``logs/ray-data``. Ray Serve's driver logger shows warnings and errors, and ``ray.init``'s
  token-authentication notice is left out;
- Ray's native (C++) log lines that its core worker copies to the driver's stderr are dropped from the console by
  :mod:`mdlm.stderr_filter` (they stay in ``python-core-driver-*.log``): no setting keeps them off the console
  but in the file;
- MLflow logs warnings only (``MLFLOW_LOGGING_LEVEL``, read when ``mlflow`` is imported; the workers of a local
  cluster inherit it), without its artifact progress bars; its model-registry notices follow its logger's level
  (:func:`mlflow_notices`).

``--verbose`` (``setup_output(verbose=True)``) leaves every library at its defaults: the full output. Ray's own
logs are under ``/tmp/ray/session_latest/logs`` on each node either way (:func:`ray_logs_dir`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOGGER = "mdlm"
# ray.init's notice that a new local cluster uses token authentication (README documents it).
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Data's choice of progress display ("Progress bars disabled. To enable, set ..."); the progress itself is logged
# by its child loggers.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
QUIET_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             # the raylet's "WARNING: 8 PYTHON worker processes have been started on node ..." (4x the cores)
             "RAY_DEDUP_LOGS_SKIP_REGEX": "PYTHON worker processes have been started on node"}
FILTER_WAIT_S = 5.0  # at exit, how long the stderr filter may take to write what it still holds

_quiet = False
_filtering = False  # fd 2 goes through mdlm.stderr_filter


class DropLogger(logging.Filter):
    """Lets every record through except those of one logger (its children's pass)."""

    def __init__(self, logger_name: str) -> None:
        super().__init__()
        self.logger_name = logger_name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != self.logger_name


class ConsoleHandler(logging.Handler):
    """Plain lines: records below WARNING to ``sys.stdout``, the others to ``sys.stderr`` with their level as a
    prefix (``warning: ...``). The streams are looked up when a record is written, so redirections apply."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                stream = sys.stderr
                message = f"{record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_output(verbose: bool = False) -> None:
    """Print the ``mdlm`` logger's records (INFO and above) as plain lines and, unless ``verbose``, keep the
    libraries' own logs off the console (module docstring). Call once, before Ray or MLflow start."""
    global _quiet
    _quiet = not verbose
    logger = logging.getLogger(LOGGER)
    logger.handlers = [h for h in logger.handlers if not isinstance(h, ConsoleHandler)] + [ConsoleHandler()]
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (e.g. ray.LoggingConfig's) would print every line twice
    if _quiet:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)  # what the user set wins
        if "mlflow" in sys.modules:  # imported already: its loggers took their level at import
            logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
        if not _filtering and sys.stderr is sys.__stderr__:  # not when the caller redirected stderr (a harness)
            _filter_native_stderr()


def _filter_native_stderr() -> None:
    """File descriptor 2 of this process (and of what it starts) into :mod:`mdlm.stderr_filter`, which writes all
    but Ray's native log lines to the real stderr; undone at exit, after the filter has written what it holds."""
    global _filtering
    script = Path(__file__).with_name("stderr_filter.py")
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", str(script)], stdin=read_end, stdout=real,
                                 start_new_session=True)  # Ctrl-C reaches the driver only
    except OSError:  # no filter: stderr stays as it is
        os.close(real)
        os.close(write_end)
        return
    finally:
        os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _filtering = True

    def restore() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer here is gone: the filter sees the end once children close it
        os.close(real)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=FILTER_WAIT_S)

    atexit.register(restore)


def ray_init_options() -> dict[str, Any]:
    """Extra ``ray.init`` arguments when quiet: workers' output stays in their log files, the driver's ``ray``
    logger shows warnings and errors; nothing otherwise (Ray's defaults)."""
    return {"log_to_driver": False, "logging_level": logging.WARNING} if _quiet else {}


def quiet_ray_loggers() -> None:
    """When quiet, the driver's Ray Data console output shows warnings and errors only (not its progress-display
    notices), so does Ray Serve's when it is imported already, and the token authentication notice is left out.
    Call before ``ray.init``; nothing when verbose."""
    if not _quiet:
        return
    import ray.data  # noqa: F401  (configures the "ray.data" logger when imported)

    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    if "ray.serve" in sys.modules:  # Serve sets its driver logger to INFO when imported
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":  # Ray Data's default config; its "file" handler keeps every record
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, DropLogger) for f in handler.filters):
                handler.addFilter(DropLogger(RAY_DATA_PROGRESS_LOGGER))


@contextlib.contextmanager
def mlflow_notices() -> Iterator[None]:
    """MLflow prints some notices (``Successfully registered model ...``) with ``eprint``, past its loggers: in this
    block they are written only when the ``mlflow`` logger is enabled for INFO, like its other INFO records (its
    warnings in the block share that stream, and go with them)."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    if logging.getLogger("mlflow").isEnabledFor(logging.INFO):
        yield
        return
    before = stream.enabled
    stream.enabled = False
    try:
        yield
    finally:
        stream.enabled = before


def ray_logs_dir() -> str | None:
    """This node's Ray session log directory while Ray is initialised on it, else None."""
    with contextlib.suppress(Exception):  # a private attribute of Ray's; the answer is a hint, never needed
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            return str(node.get_logs_dir_path())
    return None
