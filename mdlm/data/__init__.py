"""Corpora, tokenizers and packing."""
