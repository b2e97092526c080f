"""The ``mdlm`` console script as a user runs it after ``pip install -e .``: every subcommand, one syntax
(``--preset``, ``a.b=value``), config errors exit 2 naming the key, and real runs of prepare, generate and serve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mdlm.cli import COMMANDS
from tests.serve_support import free_port, make_model_dir

MDLM = shutil.which("mdlm") or str(Path(sys.executable).parent / "mdlm")


def _env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _mdlm(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MDLM, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_the_console_script_is_installed_and_lists_its_commands(tmp_path):
    assert Path(MDLM).is_file(), "pip install -e . installs the mdlm command ([project.scripts])"
    assert set(COMMANDS) == {"prepare", "train", "evaluate", "generate", "serve"}
    shown = _mdlm("--help", cwd=tmp_path)
    assert shown.returncode == 0 and all(f"  {name} " in shown.stdout for name in COMMANDS), shown.stdout
    bare = _mdlm(cwd=tmp_path)
    assert bare.returncode == 2 and bare.stdout.startswith("usage: mdlm {prepare,train,evaluate,generate,serve}")
    unknown = _mdlm("trian", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_takes_the_same_syntax(command, tmp_path):
    shown = _mdlm(command, "--help", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: mdlm {command} ")
    assert "--preset" in shown.stdout and "a.b=value" in shown.stdout and "--verbose" in shown.stdout
    # A misspelt key of the config tree, the same message from every command; nothing is written.
    bad = _mdlm(command, "model.hiden_size=3", cwd=tmp_path)
    assert bad.returncode == 2 and "config error: unknown config key 'model.hiden_size'" in bad.stderr, bad.stderr
    assert "did you mean 'model.hidden_size'" in bad.stderr
    preset = _mdlm(command, "--preset", "no-such-preset", cwd=tmp_path)
    assert preset.returncode == 2 and "unknown preset 'no-such-preset'" in preset.stderr
    assert list(tmp_path.iterdir()) == []


def test_each_command_names_the_key_of_its_own_section(tmp_path):
    cases = {"evaluate": ("eval.nelbo.mc_samples=0", "eval.nelbo.mc_samples: must be >= 1, got 0"),
             "serve": ("serve.max_batch_size=many", "serve.max_batch_size: Input should be a valid integer"),
             "generate": ("generate.device=tpu", "generate.device: 'tpu' is not one of 'cpu', 'cuda'"),
             "train": ("run.num_workers=0", "run.num_workers: must be > 0, got 0"),
             "prepare": ("data.block_size=2", "data.block_size: 2 is below 3")}
    for command, (override, message) in cases.items():
        bad = _mdlm(command, override, cwd=tmp_path)
        assert bad.returncode == 2 and f"config error: {message}" in bad.stderr, (command, bad.stderr)


def test_prepare_then_generate_through_the_console_script(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("\n\n".join(f"Line {i}.{j}: some words of text here." for j in range(30)))
    out = tmp_path / "prepared"
    prepared = _mdlm("prepare", f"data.source={corpus}", f"data.output_dir={out}", "data.tokenizer_vocab_size=300",
                     "data.block_size=32", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads((out / "manifest.json").read_text())["block_size"] == 32
    assert f"{out}: written in" in prepared.stdout

    model = make_model_dir(tmp_path / "model")
    samples = tmp_path / "samples.json"
    args = [f"generate.model={model}", "generate.prompts=[To be, Now is]", "sampling.num_samples=2",
            "sampling.length=24", "sampling.steps=8", "sampling.seed=3", f"generate.output={samples}"]
    first = _mdlm("generate", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = json.loads(samples.read_text())["samples"]
    assert [s["prompt"] for s in saved] == ["To be", "To be", "Now is", "Now is"]
    assert all(s["text"].startswith(s["prompt"]) for s in saved)
    assert first.stdout.count("--- sample ") == 4
    again = _mdlm("generate", *args, cwd=tmp_path)  # one seed: the same samples
    assert json.loads(samples.read_text())["samples"] == saved and again.stdout == first.stdout
    missing = _mdlm("generate", f"generate.model={tmp_path / 'nope'}", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: generate.model {tmp_path / 'nope'}")


@pytest.mark.ray
def test_serve_through_the_console_script_answers_http_and_stops_on_sigterm(tmp_path):
    model = make_model_dir(tmp_path / "model")
    port = free_port()
    process = subprocess.Popen([MDLM, "serve", f"serve.model={model}", f"serve.port={port}", "serve.num_cpus=0.5",
                                "serve.served_model_name=tiny"], cwd=tmp_path, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()  # printed once the app runs, as a user sees it
        assert first.startswith(f"serving {model}"), first + process.stderr.read()[-3000:]
        while not first.splitlines()[-1].startswith("  try:"):  # read the rest here: communicate() skips buffers
            first += process.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                    models = json.load(response)
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the service did not answer within 240 s"
                time.sleep(1)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        body = json.dumps({"prompt": "To be", "length": 16, "steps": 4, "seed": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["samples"][0]["text"].startswith("To be")
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    printed = first + out
    assert f"OpenAI:   base_url=http://127.0.0.1:{port}/v1" in printed and "stopping" in printed
    assert "failed" not in out + err, out + err  # stopping prints no failed task of Ray's
