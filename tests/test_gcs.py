"""gs:// for real: a GCS-compatible server (gcp-storage-emulator) on 127.0.0.1, reached through gcsfs with the
standard ``STORAGE_EMULATOR_HOST`` variable only. A corpus read from ``gs://`` and prepared to ``gs://`` gives the
same shards as on disk; the manifest there commits them; a failed run leaves no object."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import fsspec
import pytest

from mdlm.config import DataConfig
from mdlm.data.manifest import load_manifest
from mdlm.data.pipeline import prepare_dataset
from mdlm.data.sources import DataError, shakespeare_files

pytestmark = pytest.mark.ray

BUCKET = "mdlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """The emulator in memory on a free port with bucket ``mdlm``; its variable set while the module runs (before
    the module's Ray starts, so that Ray's workers inherit it, as they inherit a node's environment)."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.2)
        with mock.patch.dict(os.environ, {"STORAGE_EMULATOR_HOST": endpoint}):
            yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def _keys(prefix: str) -> list[str]:
    fs, _ = fsspec.core.url_to_fs(f"gs://{BUCKET}")
    fs.invalidate_cache()
    try:
        return sorted(p[len(BUCKET) + 1:] for p in fs.find(f"{BUCKET}/{prefix}"))
    except FileNotFoundError:
        return []


def test_prepare_from_and_to_gcs(gcs, tmp_path: Path, ray_local):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    fs, _ = fsspec.core.url_to_fs(f"gs://{BUCKET}")
    for path in shakespeare_files()[:4]:
        (corpus / path.name).write_bytes(path.read_bytes())
        fs.pipe_file(f"{BUCKET}/corpus/{path.name}", path.read_bytes())
    settings = {"tokenizer": "gpt2", "block_size": 64, "validation_fraction": 0.2, "test_fraction": 0.1,
                "file_size_mb": 0.02, "num_workers": 2}
    local = prepare_dataset(DataConfig(source=str(corpus), output_dir=str(tmp_path / "local"), **settings),
                            progress=False)
    url = f"gs://{BUCKET}/prepared/shakespeare"
    remote = prepare_dataset(DataConfig(source=f"gs://{BUCKET}/corpus", output_dir=url, **settings), progress=False)
    assert remote.source["files"] == 4 and remote.root == url
    for split, info in remote.splits.items():  # the same shards (another folder: the source's fingerprint differs)
        assert [(sh.rows, sh.bytes, sh.sha256) for sh in info.shards] == \
            [(sh.rows, sh.bytes, sh.sha256) for sh in local.splits[split].shards], split
        assert (info.rows, info.documents, info.dropped_tokens) == \
            (local.splits[split].rows, local.splits[split].documents, local.splits[split].dropped_tokens)
    loaded = load_manifest(url)
    assert loaded.split_files("train")[0].startswith(f"{url}/shards-")
    loaded.verify()
    listed = {f"prepared/shakespeare/{s.path}" for split in loaded.splits.values() for s in split.shards}
    assert listed <= set(_keys("prepared/shakespeare"))

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in corpus.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "zz_broken.txt").write_bytes(b"fine text\n\n" * 5000 + b"\xff bad")
    with pytest.raises(DataError, match=r"zz_broken\.txt"):
        prepare_dataset(DataConfig(source=str(broken), output_dir=f"gs://{BUCKET}/prepared/broken", **settings),
                        progress=False)
    assert _keys("prepared/broken") == []  # no stray objects
