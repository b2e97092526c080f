"""``manifest.json``: what a prepared dataset holds, for training and evaluation, and its commit marker.

``pipelines/prepare_data.py`` writes it last, next to ``tokenizer.json`` and the folder of parquet shards
(``shards-<fingerprint>/{train,validation,test}/``), on a local path or any fsspec URL (``s3://`` ...). It lists
every shard with its rows, tokens, size and SHA-256: readers trust only what it lists, so files of a failed or
interrupted preparation are never read. Paths inside are relative to the dataset directory, so it can be moved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mdlm.data.spec import DataSpec
from mdlm.storage import filesystem, is_local_fs, is_url, join, write_bytes_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: shards listed with rows, tokens, bytes and SHA-256
PREPARE_COMMAND = "python pipelines/prepare_data.py"


class ManifestError(ValueError):
    """A manifest.json exists but is malformed or inconsistent; the message names the file."""


@dataclass
class ShardInfo:
    """One parquet file of a split: its path (relative to the dataset directory), rows, real tokens, size in
    bytes and the SHA-256 of those bytes."""

    path: str
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """One split: its folder, its shards in row order (:class:`ShardInfo`) and what they hold."""

    path: str
    shards: list[ShardInfo] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0  # real (attention-mask) tokens, [BOS]/[EOS] included
    documents: int = 0
    dropped_tokens: int = 0  # wrap: the final remainder, shorter than one row

    @property
    def files(self) -> list[str]:
        """The shards' paths, relative to the dataset directory, in row order."""
        return [shard.path for shard in self.shards]


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
    root: str | None = field(default=None, compare=False)  # a local directory or a URL
    reused: bool = field(default=False, compare=False)  # prepare_dataset found it up to date
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # prepare_dataset's seconds

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("root", "reused", "timings"):
            data.pop(name)
        return data

    def _resolve(self, relative: str) -> str:
        return join(self.root or str(Path(".").absolute()), relative)

    def split_files(self, split: str) -> list[str]:
        """Absolute paths (or URLs) of a split's parquet files, in row order."""
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

    def save(self, directory: str | Path) -> str:
        """Write ``manifest.json`` into ``directory`` (local or URL) atomically; its path."""
        fs, root = filesystem(directory)
        path = join(root, MANIFEST_NAME) if not is_local_fs(fs) else str(Path(root) / MANIFEST_NAME)
        write_bytes_atomic(fs, path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return join(str(directory), MANIFEST_NAME)

    def verify(self) -> None:
        """Check every listed shard's size and SHA-256 against the files; :class:`ManifestError` naming the
        first that differs (reads every byte: for audits and tests, not on every load)."""
        fs, _ = filesystem(self.root or ".")
        for split in self.splits.values():
            for shard in split.shards:
                where = filesystem(self._resolve(shard.path))[1]
                digest = hashlib.sha256()
                with fs.open(where, "rb") as f:
                    while block := f.read(8 * 2**20):
                        digest.update(block)
                if digest.hexdigest() != shard.sha256:
                    raise ManifestError(f"{self._resolve(shard.path)}: its SHA-256 differs from the manifest's")


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
    shard_keys = {f.name for f in fields(ShardInfo)}
    for name, info in values["splits"].items():
        if not isinstance(info, dict) or set(info) - split_keys or "path" not in info:
            raise ManifestError(f"{where}: split {name!r} is malformed")
        shards = info.get("shards", [])
        if not isinstance(shards, list) or any(not isinstance(s, dict) or set(s) != shard_keys for s in shards):
            raise ManifestError(f"{where}: split {name!r} has malformed shards (each needs "
                                f"{', '.join(sorted(shard_keys))})")
        try:
            splits[name] = SplitInfo(**{**info, "shards": [ShardInfo(**s) for s in shards]})
        except TypeError as exc:
            raise ManifestError(f"{where}: split {name!r} is malformed ({exc})") from None
        if sum(s.rows for s in splits[name].shards) != splits[name].rows:
            raise ManifestError(f"{where}: split {name!r} lists {splits[name].rows} rows but its shards hold "
                                f"{sum(s.rows for s in splits[name].shards)}")
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
    """Load a prepared dataset's manifest from its directory (or the manifest.json path itself), local or a URL.

    Missing: ``FileNotFoundError`` with the command that prepares the data. Malformed, or listing files that
    are gone or of another size: :class:`ManifestError` naming the file (one listing of the directory, no
    reads; :meth:`Manifest.verify` checks the checksums)."""
    text = str(path)
    file = text if text.endswith(".json") else join(text, MANIFEST_NAME)
    root = file.rsplit("/", 1)[0] if is_url(file) else str(Path(file).absolute().parent)
    fs, where = filesystem(file)
    redo = f"; re-create it with: {PREPARE_COMMAND} data.output_dir={root} --force"
    try:
        with fs.open(where, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"{file}: no prepared dataset here; prepare it with: "
                                f"{PREPARE_COMMAND} data.output_dir={root}") from None
    try:
        data = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not valid JSON ({exc}){redo}") from None
    try:
        manifest = manifest_from_dict(data, file)
    except ManifestError as exc:
        raise ManifestError(f"{exc}{redo}") from None
    manifest.root = root
    if check_files:
        _check_listed_files(manifest, fs, file, redo)
    return manifest


def _check_listed_files(manifest: Manifest, fs, file: str, redo: str) -> None:
    """Every listed file exists (and every shard has its recorded size), from one listing of the directory."""
    base = filesystem(manifest.root)[1].rstrip("/")
    try:
        found = {posix_relative(p, base): info.get("size") for p, info in fs.find(base, detail=True).items()}
    except FileNotFoundError:
        found = {}
    expected: dict[str, int | None] = {manifest.tokenizer_file: None}
    expected.update({s.path: s.bytes for split in manifest.splits.values() for s in split.shards})
    for name, size in expected.items():
        if name not in found:
            raise ManifestError(f"{file}: lists {name}, which is missing{redo}")
        if size is not None and found[name] is not None and int(found[name]) != size:
            raise ManifestError(f"{file}: lists {name} with {size} bytes, but it has {found[name]}{redo}")


def posix_relative(path: str, base: str) -> str:
    """``path`` relative to ``base`` with forward slashes (fsspec paths on any filesystem)."""
    path = path.replace("\\", "/")
    return path[len(base):].lstrip("/") if path.startswith(base) else path
