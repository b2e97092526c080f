"""``pipelines/prepare_data.py`` as a user runs it: exit codes, messages on stderr, the summary, reuse."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "prepare_data.py"


def _run(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ.update(RAY_USAGE_STATS_ENABLED="0", **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text("\n\n".join(f"Line {i}.{j}: some words of text here." for j in range(40)))
    return src


def test_config_error_exits_2(tmp_path):
    result = _run("data.block_size=2", cwd=tmp_path)
    assert result.returncode == 2
    assert "config error: data.block_size: 2 is below 3" in result.stderr
    result = _run("data.blok_size=64", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'data.block_size'" in result.stderr


def test_missing_source_exits_2_and_writes_nothing(tmp_path):
    result = _run(f"data.source={tmp_path / 'nowhere'}", f"data.output_dir={tmp_path / 'out' / 'data'}",
                  cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: data.source='{tmp_path / 'nowhere'}': no such file or directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_hugging_face_name_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    result = _run("data.source=hf:mdlm-tests/no-such-dataset", f"data.output_dir={tmp_path / 'out'}",
                  cwd=tmp_path, HF_DATASETS_OFFLINE="1")
    assert result.returncode == 2
    assert time.perf_counter() - start < 60  # no network wait: import time only
    assert "error: data.source='hf:mdlm-tests/no-such-dataset': cannot load the Hugging Face dataset" in result.stderr
    assert "HF_DATASETS_OFFLINE=1" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_undecodable_file_exits_2_naming_file_and_offset(tmp_path, corpus):
    (corpus / "doc9.txt").write_bytes(b"caf\xe9 au lait\n" * 10)
    out = tmp_path / "out"
    result = _run(f"data.source={corpus}", f"data.output_dir={out}", "data.tokenizer=gpt2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {corpus / 'doc9.txt'}: cannot decode byte 0xe9 at offset 3 as utf-8" in result.stderr
    assert "data.encoding" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no temporary directory


@pytest.mark.ray
def test_prepare_then_reuse_then_force(tmp_path, corpus):
    out = tmp_path / "prepared"
    args = (f"data.source={corpus}", f"data.output_dir={out}", "data.tokenizer=gpt2", "data.block_size=32",
            "data.validation_fraction=0.0", "data.test_fraction=0.0")
    first = _run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{out}: written in" in first.stdout
    assert "tokenizer gpt2: 50,258 tokens, [MASK]=50257, BOS=50256, EOS=50256" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["vocab_size"] == 50258
    again = _run(*args, cwd=tmp_path)
    assert again.returncode == 0 and f"{out}: up to date, fingerprint {manifest['fingerprint']}" in again.stdout
    forced = _run(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 0 and f"{out}: written in" in forced.stdout
    assert json.loads((out / "manifest.json").read_text())["splits"] == manifest["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "prepared"]


class _Records(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.ray
def test_default_preparation_is_where_the_main_job_reads(tmp_path, monkeypatch):
    """``python pipelines/prepare_data.py`` with no arguments prepares the corpus the main job
    (``pipelines/train.py``, preset cpu-ray) then finds, instead of preparing it a second time."""
    from mdlm.config import load_config
    from mdlm.train.launcher import load_data

    result = _run(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = tmp_path / load_config("cpu-ray").data.output_dir
    assert f"{expected.relative_to(tmp_path)}: written in" in result.stdout
    monkeypatch.chdir(tmp_path)
    said, logger = _Records(), logging.getLogger("mdlm")
    level = logger.level
    logger.addHandler(said)
    logger.setLevel(logging.DEBUG)
    try:
        manifest = load_data(load_config("cpu-ray"))
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
    assert [r.getMessage() for r in said.records] == []  # nothing prepared a second time
    assert Path(manifest.root).resolve() == expected.resolve()
