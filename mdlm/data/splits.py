"""Deterministic train/validation/test assignment by document key (a hash, so it does not depend on
ordering or on how many workers process the corpus). Keys are ``relative/path:index``
(:func:`mdlm.data.sources.document_key`) in the Ray pipeline and in the in-process path alike."""

from __future__ import annotations

import hashlib

from mdlm.config import DataConfig
from mdlm.data.sources import DataError

SPLITS = ("train", "validation", "test")


def assign_split(key: str, validation_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """'train', 'validation' or 'test' for the document identified by ``key``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def split_of(key: str, config: DataConfig) -> str:
    """:func:`assign_split` with ``data.validation_fraction``, ``data.test_fraction`` and ``data.seed``."""
    return assign_split(key, config.validation_fraction, config.test_fraction, config.seed)


def check_train_split(config: DataConfig, documents: int, rows: int) -> None:
    """A :class:`DataError` when the training split has no documents, or too few tokens for one row."""
    if not documents:
        raise DataError(f"data.source={config.source!r}: no training documents (the corpus is empty)")
    if not rows:
        raise DataError(f"data.source={config.source!r}: the training documents are too short for one row of "
                        f"data.block_size={config.block_size}")
