"""For the service tests: a tiny model directory with a real tokenizer (random weights, built in a second), and
the Serve applications running for real on a local Ray, over HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mdlm.config import NoiseConfig, model_config_for
from mdlm.data.tokenizer import train_bpe
from mdlm.modeling import build_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
] * 4


def make_model_dir(path: Path, kind: str = "mdlm", max_seq_len: int = 32, seed: int = 0) -> Path:
    """Save a 2-layer model of ``kind`` with a trained byte-level BPE to ``path``; return ``path``."""
    tokenizer = train_bpe(SENTENCES, 300)
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = model_config_for("cpu", kind=kind, vocab_size=tokenizer.get_vocab_size(),
                              mask_token_id=tokenizer.token_to_id("[MASK]"), bos_token_id=eos, eos_token_id=eos,
                              pad_token_id=tokenizer.token_to_id("[PAD]"), max_seq_len=max_seq_len, n_layers=2,
                              hidden_size=64, n_heads=4, cond_dim=32, dropout=0.0)
    model = build_model(config, NoiseConfig() if kind == "mdlm" else None, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    return path


def make_model_dirs(root: Path) -> dict[str, Path]:
    """An MDLM and an AR model directory under ``root`` (the two applications the service tests serve)."""
    return {"mdlm": make_model_dir(root / "mdlm"), "ar": make_model_dir(root / "ar", kind="ar")}


# Request limits of the served test apps (small, so that the tests can cross each one).
LIMITS = {"num_cpus": 0.5, "max_num_samples": 8, "max_steps": 500, "max_prompt_chars": 200, "max_texts": 4,
          "max_mc_samples": 16, "max_body_bytes": 4096, "max_batch_size": 16, "batch_wait_timeout_s": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(apps: dict[str, tuple[str, dict[str, Any]]]) -> Iterator[str]:
    """Start a local Ray (2 CPUs) and Serve on 127.0.0.1, run ``build_app(args)`` for each ``name: (route_prefix,
    args)``, and yield the base URL; shut both down after."""
    import ray
    from ray import serve

    from mdlm.serve.app import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, (route_prefix, args) in apps.items():
            serve.run(build_app(args), name=name, route_prefix=route_prefix)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
