"""``manifest.json``: what a prepared dataset holds, for training and evaluation.

``pipelines/prepare_data.py`` writes it next to the parquet shards (``train/``, ``validation/``, ``test/``) and
``tokenizer.json``. Paths inside are relative to the dataset directory, so the directory can be moved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mdlm.data.spec import DataSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
PREPARE_COMMAND = "python pipelines/prepare_data.py"


class ManifestError(ValueError):
    """A manifest.json exists but is malformed or inconsistent; the message names the file."""


@dataclass
class SplitInfo:
    """One split: its folder and parquet files (relative to the dataset directory) and what they hold."""

    path: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0  # real (attention-mask) tokens, [BOS]/[EOS] included
    documents: int = 0
    dropped_tokens: int = 0  # wrap: the final remainder, shorter than one row


@dataclass
class Manifest:
    """A prepared dataset. ``root`` (the directory), ``reused`` and ``timings`` are set at run time and never
    serialised."""

    format_version: int
    fingerprint: str
    source: dict[str, Any]
    tokenizer: str  # the data.tokenizer spec it was built from
    tokenizer_file: str  # relative to root
    vocab_size: int  # includes [MASK]
    mask_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    block_size: int
    packing: str
    splits: dict[str, SplitInfo]
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    root: Path | None = field(default=None, compare=False)
    reused: bool = field(default=False, compare=False)  # prepare_dataset found it up to date
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # prepare_dataset's seconds

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("root", "reused", "timings"):
            data.pop(name)
        return data

    def _resolve(self, relative: str) -> str:
        return str((self.root or Path(".")) / relative)

    def split_files(self, split: str) -> list[str]:
        """Absolute paths of a split's parquet files, in row order."""
        return [self._resolve(name) for name in self._split(split).files]

    def rows(self, split: str) -> int:
        return self._split(split).rows

    def tokens(self, split: str) -> int:
        return self._split(split).tokens

    @property
    def tokenizer_path(self) -> str:
        return self._resolve(self.tokenizer_file)

    def data_spec(self) -> DataSpec:
        """What a model needs from the data: vocabulary, special ids, block size, tokenizer file."""
        return DataSpec(vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                        bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                        pad_token_id=self.pad_token_id, block_size=self.block_size, packing=self.packing,
                        tokenizer_file=self.tokenizer_path)

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in the prepared data (splits: {', '.join(self.splits)})")
        return self.splits[split]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_type(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def manifest_from_dict(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Build and validate a :class:`Manifest`; :class:`ManifestError` naming ``where`` on any problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    version = _check_type(data, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    kinds: dict[str, type | tuple[type, ...]] = {
        "fingerprint": str, "source": dict, "tokenizer": str, "tokenizer_file": str, "vocab_size": int,
        "mask_token_id": int, "bos_token_id": int, "eos_token_id": int, "pad_token_id": int, "block_size": int,
        "packing": str, "splits": dict, "config": dict, "created": str}
    values = {key: _check_type(data, key, kind, where) for key, kind in kinds.items()
              if key in data or key not in ("config", "created")}
    splits = {}
    split_keys = {f.name for f in fields(SplitInfo)}
    for name, info in values["splits"].items():
        if not isinstance(info, dict) or set(info) - split_keys or "path" not in info:
            raise ManifestError(f"{where}: split {name!r} is malformed")
        try:
            splits[name] = SplitInfo(**info)
        except TypeError as exc:
            raise ManifestError(f"{where}: split {name!r} is malformed ({exc})") from None
    values["splits"] = splits
    manifest = Manifest(format_version=version, **values)
    if "train" not in splits:
        raise ManifestError(f"{where}: no 'train' split")
    if manifest.packing not in ("wrap", "pad"):
        raise ManifestError(f"{where}: packing {manifest.packing!r} is not 'wrap' or 'pad'")
    if manifest.block_size < 3:
        raise ManifestError(f"{where}: block_size {manifest.block_size} is below 3")
    for key in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if not 0 <= getattr(manifest, key) < manifest.vocab_size:
            raise ManifestError(f"{where}: {key} {getattr(manifest, key)} is outside the vocabulary "
                                f"[0, {manifest.vocab_size})")
    return manifest


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Load a prepared dataset's manifest from its directory (or the manifest.json path itself).

    Missing: ``FileNotFoundError`` with the command that prepares the data. Malformed, or naming files that
    are gone: :class:`ManifestError` naming the file."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / MANIFEST_NAME
    root = file.parent
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no prepared dataset here; prepare it with: "
                                f"{PREPARE_COMMAND} data.output_dir={root}")
    redo = f"; re-create it with: {PREPARE_COMMAND} data.output_dir={root} --force"
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not valid JSON ({exc}){redo}") from None
    try:
        manifest = manifest_from_dict(data, str(file))
    except ManifestError as exc:
        raise ManifestError(f"{exc}{redo}") from None
    manifest.root = root.absolute()
    if check_files:
        for name in [manifest.tokenizer_file, *(f for s in manifest.splits.values() for f in s.files)]:
            if not (manifest.root / name).is_file():
                raise ManifestError(f"{file}: lists {name}, which is missing{redo}")
    return manifest
