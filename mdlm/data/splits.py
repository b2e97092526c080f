"""Deterministic train/validation/test assignment by document key (a hash, so it does not depend on
ordering or on how many workers process the corpus)."""

from __future__ import annotations

import hashlib


def assign_split(key: str, validation_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """'train', 'validation' or 'test' for the document identified by ``key``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"
