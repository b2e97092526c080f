"""Where things are stored: local paths vs URLs, and publishing files and directories atomically.

Torch-free (Ray Data workers import it). Every "is this a URL" question and every write-then-rename in the
package goes through here, so a reader never sees half a file or half a directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (s3://, gs://, file://, ...); False for a local path."""
    return "://" in str(path)


def is_mlflow_uri(path: str | os.PathLike[str]) -> bool:
    """True for MLflow model URIs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/PATH``."""
    return str(path).startswith(MLFLOW_SCHEMES)


def absolute(path: str | os.PathLike[str]) -> str:
    """A URL as it is; a local path made absolute."""
    return str(path) if is_url(path) else str(Path(path).absolute())


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_sibling(target: Path) -> Path:
    """A fresh name beside ``target`` for its temporary copy; leftovers of earlier writers on this host whose
    process is gone are removed first."""
    host = socket.gethostname().replace("-", "_")
    for stale in target.parent.glob(f".{target.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return target.parent / f".{target.name}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target`` (any previous
    one is moved aside first and put back if the swap fails); on error it is removed and ``target`` is untouched."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None and not target.exists():
                old.rename(target)  # put the previous one back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` through a temporary sibling file renamed into place (never half a file)."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def filesystem(path: str | os.PathLike[str]):
    """``(fsspec filesystem, path in it)`` for a local path (made absolute, ``~`` expanded) or any fsspec URL."""
    import fsspec

    text = os.path.expanduser(str(path))
    if not is_url(text):
        text = str(Path(text).absolute())
    return fsspec.core.url_to_fs(text)


def is_local_fs(fs) -> bool:
    """True for fsspec's local filesystem."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


_TEMPORARY = ".tmp-"  # in the names of write_bytes_atomic's temporary files


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`write_bytes_atomic`'s temporary files (a writer killed mid-write
    leaves one behind)."""
    return name.startswith(".") and _TEMPORARY in name


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` of ``fs`` whole or not at all: a local file goes through a temporary sibling
    renamed into place; an object store's single PUT is atomic already."""
    if is_local_fs(fs):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}{_TEMPORARY}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        fs.pipe_file(path, data)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a local file or of an fsspec URL (``FileNotFoundError`` when there is none)."""
    fs, where = filesystem(path)
    with fs.open(where, "rb") as f:
        return f.read()
