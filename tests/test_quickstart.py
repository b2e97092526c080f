"""The README's main job, end to end: train on the default corpus, evaluate, export, reload, sample."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mdlm

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "quickstart.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_trains_exports_and_samples(tmp_path):
    out = run("training.max_steps=30", "training.log_every=10", "model.n_layers=2", "sampling.steps=16",
              "sampling.num_samples=2", "sampling.length=48", "--output", str(tmp_path / "model"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "step    30" in text and "validation NELBO" in text
    losses = [float(line.split("loss")[1].split()[0]) for line in text.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]
    assert text.count("--- sample") == 2
    saved = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert saved == ["README.md", "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| optimizer steps | 30 |" in card and "| validation NELBO (nats/token) |" in card
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "mdlm" and config["model"]["vocab_size"] == 1024
    model = mdlm.load_pretrained(tmp_path / "model")
    texts = model.generate("KING.\n", num_samples=1, length=32, steps=8, seed=0)
    assert texts[0].startswith("KING.")
    filled = model.generate(infill="To be, or [MASK][MASK][MASK] to be", num_samples=2, steps=4, seed=0)
    assert all(t.startswith("To be, or ") and t.endswith(" to be") for t in filled), filled
    assert model.sample(1, 32, steps=8, seed=0).tokens.max() < 1023  # never the [MASK] id
    assert isinstance(model.tokenizer.encode("Hello").ids, list)
    assert torch.isfinite(next(model.parameters())).all()


def test_quickstart_rejects_bad_config(tmp_path):
    out = run("model.hiden_size=3", cwd=tmp_path)
    assert out.returncode == 2
    assert "model.hiden_size" in out.stderr and "hidden_size" in out.stderr
    assert not (tmp_path / "runs").exists()
