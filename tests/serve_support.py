"""A tiny model directory with a real tokenizer, for the service tests (random weights, built in a second)."""

from __future__ import annotations

from pathlib import Path

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
