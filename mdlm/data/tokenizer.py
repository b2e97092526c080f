"""Tokenizers for mdlm: train a byte-level BPE on the corpus, or load one; ensure a [MASK] token.

MDLM reuses a tokenizer's own [MASK] (bert-base-uncased: id 103) and otherwise appends one at the end
of the vocabulary (GPT-2: 50,257 -> 50,258 tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

MASK_TOKEN = "[MASK]"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the model and the packers need. ``vocab_size`` counts [MASK]."""

    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` with <|endoftext|> (BOS = EOS, as GPT-2), [PAD] and [MASK]."""
    if vocab_size < 260:
        raise ValueError(f"byte-level BPE needs vocab_size >= 260 (256 bytes + specials), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ensure_mask_token(tokenizer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; padding and truncation are switched off (packing does that)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def ensure_mask_token(tokenizer: Tokenizer) -> int:
    """The id of [MASK], adding it as a special token at the end of the vocabulary if missing."""
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    if mask_id is None:
        tokenizer.add_special_tokens([MASK_TOKEN])
        mask_id = tokenizer.token_to_id(MASK_TOKEN)
    return mask_id


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """Resolve [MASK], BOS, EOS and PAD ids; BERT-style [CLS]/[SEP] serve as BOS/EOS when present."""
    mask_id = ensure_mask_token(tokenizer)

    def first(*names: str) -> int | None:
        for name in names:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    bos = first(EOS_TOKEN, "[CLS]", "<s>", "[BOS]")
    eos = first(EOS_TOKEN, "[SEP]", "</s>", "[EOS]")
    if bos is None or eos is None:
        raise ValueError("tokenizer has no BOS/EOS token (looked for <|endoftext|>, [CLS]/[SEP], <s>/</s>)")
    pad = first(PAD_TOKEN, "<pad>")
    return SpecialTokens(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), mask_id=mask_id,
                         bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else eos)
