"""Batch evaluation as Ray Data jobs with model-holding actors (CPU or GPU).

    results = run_evaluation(EvalRequest(model="models:/mdlm@current", data=["data/prepared/..."]))

**Perplexity bound (NELBO).** The prepared splits of all corpora (the model's own, then zero-shot ones) are
read in one job by ``IndexedParquetDatasource``, a Ray Data datasource that tags every row with its corpus
and its index in the split and emits blocks of exactly ``batch_size`` rows of one corpus, aligned on
multiples of ``batch_size`` (the last one shorter). ``map_batches`` sends them to a pool of
:class:`NelboActor` (``ActorPoolStrategy``; fractional CPUs on CPU so the read tasks are never starved, one
GPU each on CUDA), which load the model once and return K Monte-Carlo NELBO sums and the token count of each
row (:func:`score_rows`). Row i draws its times and masks from its own generator seeded by
``row_seed(seed, i)``, and rows are scored in the same aligned groups whatever the pool, so the numbers do not
depend on the number of actors (bit for bit), nor on which other corpora run alongside, and, up to float
rounding of batched matmuls, not on the batch size either. The driver gathers the rows and computes
:func:`~mdlm.eval.metrics.summarize_nelbo` per corpus.

**Generative perplexity.** The sample-batch indices 0..B-1 go to a pool of
:class:`GenerateActor`, each holding the model and the autoregressive evaluator: batch j draws its samples
with seed ``row_seed(seed, j)``, decodes them, re-tokenizes and scores them with the evaluator
(:mod:`mdlm.eval.evaluator`) and measures each sample's unigram entropy.

Model (and evaluator) files travel to the actors through the object store, so actors on other nodes need no
access to the driver's disk (an MLflow download lands in a driver-local temporary folder).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdlm.eval import EvalInputError
from mdlm.eval.metrics import NelboSummary, generative_perplexity, summarize_nelbo, unigram_entropy

READ_CPUS = 0.25  # logical CPUs of a read task
RESERVED_CPUS = 0.5  # kept free of model actors, so that read tasks always find a CPU
MLFLOW_SCHEMES = ("models:/", "runs:/")


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class NelboSettings:
    """The NELBO job: which split, how many Monte-Carlo time samples, and how it runs."""

    split: str = "test"
    mc_samples: int = 1
    max_rows: int | None = None  # the first N rows of the split (quick runs)
    batch_size: int = 16  # rows per forward pass; also the alignment of the per-actor groups
    num_actors: int = 1
    device: str = "cpu"  # 'cpu' or 'cuda' (one GPU per actor)
    cpus_per_actor: float | None = None  # None: share the cluster's CPUs, less RESERVED_CPUS
    seed: int = 0
    confidence: float = 0.95

    def validate(self) -> None:
        if self.mc_samples < 1:
            raise EvalInputError(f"--mc-samples: must be >= 1, got {self.mc_samples}")
        if self.max_rows is not None and self.max_rows < 1:
            raise EvalInputError(f"--max-rows: must be >= 1, got {self.max_rows}")
        if self.batch_size < 1:
            raise EvalInputError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.num_actors < 1:
            raise EvalInputError(f"--num-actors: must be >= 1, got {self.num_actors}")
        if self.device not in ("cpu", "cuda"):
            raise EvalInputError(f"--device: {self.device!r} is not 'cpu' or 'cuda'")
        if self.cpus_per_actor is not None and not self.cpus_per_actor > 0:
            raise EvalInputError(f"--cpus-per-actor: must be > 0, got {self.cpus_per_actor}")
        if not self.split.strip():
            raise EvalInputError("--split: may not be empty")
        if not 0.0 < self.confidence < 1.0:
            raise EvalInputError(f"--confidence: must be in (0, 1), got {self.confidence}")


@dataclass
class GenSettings:
    """Generative perplexity: samples from the model, scored by an autoregressive evaluator."""

    num_samples: int = 0  # 0: skip
    evaluator: str | None = None  # AR baseline directory/URI or local Hugging Face causal-LM directory
    length: int | None = None  # None: the model's max_seq_len
    steps: int | None = None  # None: one per generated position (MDLM samplers)
    sampler: str = "cached"
    top_p: float = 1.0
    dtype: str = "float64"
    stride: int | None = None  # semi-autoregressive generation beyond max_seq_len
    seed: int = 0
    batch_size: int = 8  # samples per generation call
    evaluator_batch_size: int = 8
    evaluator_max_length: int | None = None  # None: the evaluator's context length
    evaluator_stride: int | None = None  # None: half the context

    def validate(self) -> None:
        from mdlm.sampling.samplers import SAMPLERS

        if self.num_samples < 0:
            raise EvalInputError(f"--gen-samples: must be >= 0, got {self.num_samples}")
        if not self.num_samples:
            return
        if not self.evaluator:
            raise EvalInputError("--evaluator: required with --gen-samples (an AR model directory or URI, or a "
                                 "local Hugging Face causal-LM directory)")
        if self.sampler not in SAMPLERS:
            raise EvalInputError(f"--sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not 0.0 < self.top_p <= 1.0:
            raise EvalInputError(f"--top-p: {self.top_p} is not in (0, 1]")
        if self.dtype not in ("float64", "float32"):
            raise EvalInputError(f"--gen-dtype: {self.dtype!r} is not 'float64' or 'float32'")
        for name in ("length", "steps", "stride", "evaluator_max_length", "evaluator_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalInputError(f"--{_flag(name)}: must be >= 1, got {value}")
        for name in ("batch_size", "evaluator_batch_size"):
            if getattr(self, name) < 1:
                raise EvalInputError(f"--{_flag(name)}: must be >= 1, got {getattr(self, name)}")


def _flag(name: str) -> str:
    names = {"length": "gen-length", "steps": "gen-steps", "stride": "gen-stride", "batch_size": "gen-batch-size"}
    return names.get(name, name.replace("_", "-"))


# ---------------------------------------------------------------------------------------------------------
# The model and the corpora: resolve and check everything before any Ray work


@dataclass
class ModelInfo:
    """A resolved model directory and what the checks need from it (weights are not loaded)."""

    uri: str
    local_dir: Path
    model_type: str  # 'mdlm' or 'ar'
    config: Any  # ModelConfig
    noise: dict[str, Any] | None
    tokenizer_file: Path | None

    @property
    def is_mdlm(self) -> bool:
        return self.model_type == "mdlm"


def inspect_model(uri: str) -> ModelInfo:
    """Resolve ``uri`` (path, fsspec URL, ``models:/``, ``runs:/``; MLflow URIs use the current tracking URI)
    and validate its ``config.json`` and weights file; :class:`EvalInputError` naming ``--model`` otherwise."""
    from mdlm.config import ConfigError, ModelConfig, _section_from_dict
    from mdlm.hub import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, resolve_model_dir

    try:
        root = resolve_model_dir(uri)
    except Exception as exc:  # MLflow: unknown model or run; fsspec: missing directory
        raise EvalInputError(f"--model {uri}: cannot be resolved ({str(exc).splitlines()[0]})") from None
    if not root.is_dir():
        raise EvalInputError(f"--model {uri}: model directory not found")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise EvalInputError(f"--model {uri}: {config_path} is missing (not a model saved with save_pretrained)")
    try:
        raw = json.loads(config_path.read_text())
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        if model_type not in ("mdlm", "ar"):
            raise EvalInputError(f"--model {uri}: {config_path} has model_type {model_type!r}, not 'mdlm' or 'ar'")
        config = _section_from_dict(ModelConfig, raw.get("model") or {}, "model")
        config.validate()
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
        raise EvalInputError(f"--model {uri}: {config_path}: {exc}") from None
    if not (root / WEIGHTS_NAME).is_file():
        raise EvalInputError(f"--model {uri}: {root / WEIGHTS_NAME} is missing")
    tokenizer = root / TOKENIZER_NAME
    return ModelInfo(uri=str(uri), local_dir=root, model_type=model_type, config=config, noise=raw.get("noise"),
                     tokenizer_file=tokenizer if tokenizer.is_file() else None)


@dataclass
class Corpus:
    """A prepared data directory and the split to evaluate."""

    name: str
    path: Path
    manifest: Any  # Manifest
    split: str
    rows: int  # rows to evaluate (max_rows applied)


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after its folder) -> (name, dir)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, path
    return Path(spec.rstrip("/")).name or spec, spec


def open_corpus(spec: str, split: str, max_rows: int | None = None) -> Corpus:
    """Load a prepared directory's manifest and check that ``split`` exists and has rows."""
    from mdlm.data.manifest import ManifestError, load_manifest

    name, path = parse_data_spec(spec)
    try:
        manifest = load_manifest(path)
    except FileNotFoundError as exc:
        raise EvalInputError(f"--data {path}: {exc}") from None
    except ManifestError as exc:
        raise EvalInputError(f"--data {path}: {exc}") from None
    if split not in manifest.splits:
        raise EvalInputError(f"--split: no split {split!r} in {path} (splits: {', '.join(manifest.splits)})")
    rows = manifest.rows(split)
    if rows < 1:
        raise EvalInputError(f"--split: the {split!r} split of {path} is empty")
    return Corpus(name=name, path=Path(path), manifest=manifest, split=split,
                  rows=min(rows, max_rows) if max_rows else rows)


def _tokenizer_json(path: Path) -> dict[str, Any]:
    """A tokenizer file as the tokenizers library serialises it (so formatting differences do not count)."""
    from tokenizers import Tokenizer

    return json.loads(Tokenizer.from_file(str(path)).to_str())


def check_compatible(model: ModelInfo, corpus: Corpus) -> None:
    """The data must be tokenized as the model was trained: vocabulary size, [MASK] id, tokenizer.json content
    (when both have one), and rows no longer than the model's context."""
    manifest, config = corpus.manifest, model.config
    where = f"--data {corpus.path}: its tokenizer ({manifest.tokenizer_path})"
    against = f"the model's ({model.uri})"
    if manifest.vocab_size != config.vocab_size:
        raise EvalInputError(f"{where} has {manifest.vocab_size} tokens, {against} has {config.vocab_size}")
    if config.mask_token_id is not None and manifest.mask_token_id != config.mask_token_id:
        raise EvalInputError(f"{where} has [MASK] = {manifest.mask_token_id}, {against} has "
                             f"{config.mask_token_id}")
    if model.tokenizer_file is not None and Path(manifest.tokenizer_path).is_file() \
            and _tokenizer_json(model.tokenizer_file) != _tokenizer_json(Path(manifest.tokenizer_path)):
        raise EvalInputError(f"{where} differs from {against} tokenizer.json ({model.tokenizer_file})")
    if manifest.block_size > config.max_seq_len:
        raise EvalInputError(f"--data {corpus.path}: rows of {manifest.block_size} tokens exceed the model's "
                             f"max_seq_len {config.max_seq_len}")


# ---------------------------------------------------------------------------------------------------------
# Reading: a datasource that knows each row's index


def _split_columns(path: str) -> list[str]:
    names = pq.read_schema(path).names
    if "input_ids" not in names:
        raise EvalInputError(f"{path}: no 'input_ids' column (columns: {', '.join(names)})")
    return [c for c in ("input_ids", "attention_mask") if c in names]


def _read_rows(corpus: int, files: Sequence[str], file_rows: Sequence[int], columns: list[str], start: int,
               stop: int, block_rows: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of one corpus's concatenated files, with ``corpus`` and ``row_index`` columns, in blocks
    of ``block_rows`` rows."""
    parts = []
    offset = 0
    for path, count in zip(files, file_rows, strict=True):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            parquet = pq.ParquetFile(path)
            groups, group_start, first_group_start = [], 0, None
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if group_start < hi - offset and group_start + n > lo - offset:
                    groups.append(g)
                    first_group_start = group_start if first_group_start is None else first_group_start
                group_start += n
            table = parquet.read_row_groups(groups, columns=columns)
            parts.append(table.slice(lo - offset - first_group_start, hi - lo))
        offset += count
    table = pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]
    table = table.append_column("corpus", pa.array(np.full(stop - start, corpus, dtype=np.int32)))
    table = table.append_column("row_index", pa.array(np.arange(start, stop, dtype=np.int64)))
    for begin in range(0, table.num_rows, block_rows):
        yield table.slice(begin, block_rows)


@dataclass
class _SplitFiles:
    files: list[str]
    file_rows: list[int]
    columns: list[str]
    rows: int  # rows to read (max_rows applied)
    row_bytes: int


def _split_files(corpus: Corpus) -> _SplitFiles:
    files = corpus.manifest.split_files(corpus.split)
    metadata = [pq.read_metadata(f) for f in files]
    total = sum(m.num_rows for m in metadata)
    on_disk = sum(m.row_group(g).total_byte_size for m in metadata for g in range(m.num_row_groups))
    columns = _split_columns(files[0])
    if any(_split_columns(f) != columns for f in files[1:]):
        raise EvalInputError(f"--data {corpus.path}: the {corpus.split} files do not share one set of columns")
    if total < corpus.rows:
        raise EvalInputError(f"--data {corpus.path}: the {corpus.split} files hold {total} rows, fewer than the "
                             f"manifest's {corpus.manifest.rows(corpus.split)}; prepare the data again")
    return _SplitFiles(files=files, file_rows=[m.num_rows for m in metadata], columns=columns,
                       rows=min(total, corpus.rows), row_bytes=max(1, on_disk // max(total, 1)))


def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class IndexedParquetDatasource(Datasource):
        """The evaluated rows of several corpora's splits, each tagged with its corpus number (``corpus``) and
        its index in that split (``row_index``), in blocks of ``block_rows`` rows of one corpus aligned on
        multiples of ``block_rows``."""

        def __init__(self, splits: Sequence[_SplitFiles], block_rows: int) -> None:
            super().__init__()
            self.splits, self.block_rows = list(splits), block_rows
            # Every block: (corpus, first row, end row).
            self.blocks = [(c, start, min(start + block_rows, split.rows)) for c, split in enumerate(self.splits)
                           for start in range(0, split.rows, block_rows)]

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(split.rows * split.row_bytes for split in self.splits)

        def get_name(self) -> str:
            return "IndexedParquet"

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            count = len(self.blocks)
            tasks = max(1, min(parallelism if parallelism > 0 else count, count))
            bounds = np.linspace(0, count, tasks + 1).round().astype(int)
            out = []
            for lo, hi in itertools.pairwise(bounds):
                # One task's blocks, as contiguous row ranges of each corpus they belong to.
                for corpus in sorted({self.blocks[i][0] for i in range(lo, hi)}):
                    mine = [self.blocks[i] for i in range(lo, hi) if self.blocks[i][0] == corpus]
                    split, start, stop = self.splits[corpus], mine[0][1], mine[-1][2]
                    args = (corpus, split.files, split.file_rows, split.columns, start, stop, self.block_rows)
                    meta = BlockMetadata(num_rows=stop - start, size_bytes=int((stop - start) * split.row_bytes),
                                         input_files=split.files, exec_stats=None)
                    out.append(ReadTask(lambda args=args: _read_rows(*args), meta,
                                        per_task_row_limit=per_task_row_limit))
            return out

    return IndexedParquetDatasource


def read_indexed_splits(corpora: Sequence[Corpus], block_rows: int):
    """The Ray dataset of the corpora's evaluated rows: ``input_ids`` [, ``attention_mask``], ``corpus`` (position
    in ``corpora``), ``row_index`` (position in its split)."""
    import ray

    source = _datasource_class()([_split_files(c) for c in corpora], block_rows)
    return ray.data.read_datasource(source, num_cpus=READ_CPUS)


# ---------------------------------------------------------------------------------------------------------
# Scoring rows (used by the actors, and usable in-process)


def score_rows(model, input_ids: np.ndarray, attention_mask: np.ndarray | None, row_index: np.ndarray, *,
               mc_samples: int, seed: int, group_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(nll [N, K], num_tokens [N]) of rows with global indices ``row_index``: rows are scored in groups of the
    same ``row_index // group_rows`` (one forward pass each), row i drawing from ``row_seed(seed, i)``."""
    import torch

    from mdlm.eval.metrics import row_generators, sequence_nll

    groups = np.asarray(row_index) // group_rows
    nll = np.empty((len(row_index), mc_samples), dtype=np.float64)
    tokens = np.empty(len(row_index), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(groups)) + 1
    for part in np.split(np.arange(len(row_index)), boundaries):
        if not len(part):
            continue
        ids = torch.as_tensor(input_ids[part], dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask[part], dtype=torch.long)
        values, counts = sequence_nll(model, ids, mask, mc_samples=mc_samples,
                                      generator=row_generators(seed, row_index[part]))
        nll[part], tokens[part] = values.cpu().numpy(), counts.cpu().numpy()
    return nll, tokens


def _column_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<int> column of equal-length rows -> int64 [N, L]."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(column), -1)


def read_dir_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The regular top-level files of a model directory, by name (hidden files skipped)."""
    root = Path(path)
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


@contextlib.contextmanager
def materialized(files: dict[str, bytes]) -> Iterator[Path]:
    """The files written to a temporary directory for as long as the block runs."""
    root = Path(tempfile.mkdtemp(prefix="mdlm-eval-model-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _get(ref_or_value: Any) -> Any:
    import ray

    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value


def _setup_torch(device: str, threads: int):
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    return torch.device("cuda" if device == "cuda" else "cpu")


class NelboActor:
    """Holds the model; scores batches of indexed rows (:func:`score_rows`)."""

    def __init__(self, model_files: list, device: str, mc_samples: int, seed: int, group_rows: int,
                 threads: int) -> None:
        from mdlm.modeling import load_pretrained

        torch_device = _setup_torch(device, threads)
        with materialized(_get(model_files[0])) as path:
            self.model = load_pretrained(path, map_location=torch_device)
        self.mc_samples, self.seed, self.group_rows = mc_samples, seed, group_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = _column_matrix(batch["input_ids"])
        mask = _column_matrix(batch["attention_mask"]) if "attention_mask" in batch.column_names else None
        corpus, index = batch["corpus"].to_numpy(), batch["row_index"].to_numpy()
        nll = np.empty((len(index), self.mc_samples), dtype=np.float64)
        tokens = np.empty(len(index), dtype=np.float64)
        for c in np.unique(corpus):
            rows = np.flatnonzero(corpus == c)
            nll[rows], tokens[rows] = score_rows(self.model, ids[rows], None if mask is None else mask[rows],
                                                 index[rows], mc_samples=self.mc_samples, seed=self.seed,
                                                 group_rows=self.group_rows)
        values = pa.FixedSizeListArray.from_arrays(pa.array(nll.ravel()), self.mc_samples)
        return pa.table({"corpus": pa.array(corpus), "row_index": pa.array(index), "nll": values,
                         "num_tokens": pa.array(tokens)})


def generate_samples(model, num_samples: int, gen: GenSettings, seed: int):
    """Unconditional samples from ``model`` (after its BOS, as training rows start): (tokens [N, L], prefix
    length, forward passes)."""
    bos = model.config.bos_token_id
    prefix = [bos] if bos is not None else None
    kwargs: dict[str, Any] = {"top_p": gen.top_p, "dtype": gen.dtype, "prefix": prefix, "seed": seed}
    if model.model_type == "mdlm":
        kwargs.update(steps=gen.steps, sampler=gen.sampler, stride=gen.stride)
    out = model.sample(num_samples, gen.length or model.config.max_seq_len, **kwargs)
    return out.tokens, len(prefix or []), out.num_forward_passes


def generate_and_score(model, scorer, batch_index: int, gen: GenSettings) -> dict[str, list]:
    """Sample batch ``batch_index`` (seed ``row_seed(gen.seed, batch_index)``), decode it, score the texts with the
    evaluator and measure each sample's unigram entropy (generated tokens only)."""
    from mdlm.eval.metrics import row_seed

    count = min(gen.batch_size, gen.num_samples - batch_index * gen.batch_size)
    tokens, prefix, passes = generate_samples(model, count, gen, row_seed(gen.seed, batch_index))
    texts = model.decode(tokens)
    nll, scored = scorer.score_texts(texts, gen.evaluator_batch_size)
    entropies, _ = unigram_entropy(tokens[:, prefix:].cpu())
    first = batch_index * gen.batch_size
    return {"sample_index": list(range(first, first + count)), "text": texts, "nll": nll.tolist(),
            "num_tokens": scored.tolist(), "entropy": entropies, "forward_passes": [passes] * count}


class GenerateActor:
    """Holds the model and the autoregressive evaluator; turns sample-batch indices into scored samples."""

    def __init__(self, model_files: list, evaluator_files: list, evaluator_name: str, device: str,
                 gen: GenSettings, threads: int) -> None:
        from mdlm.eval.evaluator import load_scorer
        from mdlm.modeling import load_pretrained

        torch_device = _setup_torch(device, threads)
        with materialized(_get(model_files[0])) as path:
            self.model = load_pretrained(path, map_location=torch_device)
        with materialized(_get(evaluator_files[0])) as path:
            self.scorer = load_scorer(path, torch_device, name=evaluator_name, max_length=gen.evaluator_max_length,
                                      stride=gen.evaluator_stride)
        self.gen = gen

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows: dict[str, list] = {}
        for index in batch["id"]:
            for key, values in generate_and_score(self.model, self.scorer, int(index), self.gen).items():
                rows.setdefault(key, []).extend(values)
        rows["evaluator"] = [json.dumps(self.scorer.describe())] * len(rows["text"])
        return {key: np.asarray(values, dtype=object if key in ("text", "evaluator") else None)
                for key, values in rows.items()}


# ---------------------------------------------------------------------------------------------------------
# The jobs


@dataclass
class CorpusResult:
    name: str
    data_dir: str
    split: str
    summary: NelboSummary
    nll: np.ndarray  # [N, K] per-row NELBO (or NLL) sums
    num_tokens: np.ndarray  # [N]
    tokenizer: str = ""

    def to_dict(self, bound: bool) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "split": self.split, "tokenizer": self.tokenizer,
                "metric": "nelbo" if bound else "nll", **self.summary.to_dict()}


@dataclass
class GenResult:
    gen_ppl: float
    gen_nll: float  # evaluator NLL per scored token
    entropy: float  # mean unigram entropy of the samples (nats)
    samples: list[dict[str, Any]]
    evaluator: dict[str, Any]
    settings: dict[str, Any]
    forward_passes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"gen_ppl": self.gen_ppl, "gen_nll": self.gen_nll, "entropy": self.entropy,
                "mean_forward_passes": self.forward_passes, "evaluator": self.evaluator, **self.settings,
                "samples": self.samples}


@dataclass
class _Resources:
    device: str
    num_cpus: float
    num_gpus: float
    threads: int


def _resources(settings: NelboSettings, actors: int) -> _Resources:
    """Per-actor resources; fails early (instead of hanging) when the cluster cannot hold the pool."""
    import ray

    cluster = ray.cluster_resources()
    cpus = float(cluster.get("CPU", 1.0))
    if settings.device == "cuda":
        gpus = float(cluster.get("GPU", 0.0))
        if gpus < actors:
            raise EvalInputError(f"--device cuda: {actors} actor(s) need one GPU each; the Ray cluster has "
                                 f"{gpus:g}")
        per_actor = settings.cpus_per_actor or 1.0
        return _Resources("cuda", per_actor, 1.0, max(1, int(per_actor)))
    per_actor = settings.cpus_per_actor or max(0.05, min(1.0, round((cpus - RESERVED_CPUS) / actors, 2)))
    if per_actor * actors + READ_CPUS > cpus:
        raise EvalInputError(f"--num-actors: {actors} actors x {per_actor:g} CPU leave no CPU for reading on a "
                             f"cluster of {cpus:g} CPUs; use fewer actors or --cpus-per-actor")
    return _Resources("cpu", per_actor, 0.0, max(1, round(per_actor)))


def nelbo_job(model_ref: Any, corpora: Sequence[Corpus], settings: NelboSettings) -> list[CorpusResult]:
    """NELBO (or AR NLL) of every evaluated row of each corpus, in one Ray Data job on a pool of
    :class:`NelboActor` (the model is loaded once per actor for all corpora)."""
    from ray.data import ActorPoolStrategy

    blocks = sum(-(-c.rows // settings.batch_size) for c in corpora)
    actors = min(settings.num_actors, blocks)
    res = _resources(settings, actors)
    scored = read_indexed_splits(corpora, settings.batch_size).map_batches(
        NelboActor, batch_size=settings.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        fn_constructor_kwargs={"model_files": [model_ref], "device": res.device, "mc_samples": settings.mc_samples,
                               "seed": settings.seed, "group_rows": settings.batch_size, "threads": res.threads})
    index = [np.full(c.rows, -1, dtype=np.int64) for c in corpora]
    nll = [np.zeros((c.rows, settings.mc_samples), dtype=np.float64) for c in corpora]
    tokens = [np.zeros(c.rows, dtype=np.float64) for c in corpora]
    seen = [0] * len(corpora)
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        corpus, rows = batch["corpus"].to_numpy(), batch["row_index"].to_numpy()
        values = pc.list_flatten(batch["nll"]).to_numpy().reshape(len(rows), settings.mc_samples)
        counts = batch["num_tokens"].to_numpy()
        for c in np.unique(corpus):
            mine = corpus == c
            index[c][rows[mine]] = rows[mine]
            nll[c][rows[mine]], tokens[c][rows[mine]] = values[mine], counts[mine]
            seen[c] += int(mine.sum())
    results = []
    for c, corpus in enumerate(corpora):
        if seen[c] != corpus.rows or not np.array_equal(index[c], np.arange(corpus.rows)):
            raise RuntimeError(f"{corpus.path}: scored {seen[c]} rows, expected each of {corpus.rows} once")
        results.append(CorpusResult(name=corpus.name, data_dir=str(Path(corpus.path).absolute()),
                                    split=corpus.split, nll=nll[c], num_tokens=tokens[c],
                                    summary=summarize_nelbo(nll[c], tokens[c], confidence=settings.confidence),
                                    tokenizer=corpus.manifest.tokenizer))
    return results


def generation_job(model_ref: Any, evaluator_ref: Any, evaluator_name: str, gen: GenSettings,
                   settings: NelboSettings) -> GenResult:
    """Generative perplexity and entropy of ``gen.num_samples`` samples on a pool of :class:`GenerateActor`."""
    import ray
    from ray.data import ActorPoolStrategy

    batches = -(-gen.num_samples // gen.batch_size)
    actors = min(settings.num_actors, batches)
    res = _resources(settings, actors)
    # from_items: the indices are made on the driver, so no read task competes with the actors for CPUs.
    out = ray.data.from_items([{"id": i} for i in range(batches)], override_num_blocks=batches).map_batches(
        GenerateActor, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        fn_constructor_kwargs={"model_files": [model_ref], "evaluator_files": [evaluator_ref],
                               "evaluator_name": evaluator_name, "device": res.device, "gen": gen,
                               "threads": res.threads})
    rows = sorted(out.take_all(), key=lambda row: int(row["sample_index"]))
    if [int(r["sample_index"]) for r in rows] != list(range(gen.num_samples)):
        raise RuntimeError(f"generated {len(rows)} samples, expected {gen.num_samples}")
    samples = [{"index": int(r["sample_index"]), "text": str(r["text"]), "nll": float(r["nll"]),
                "num_tokens": int(r["num_tokens"]), "entropy": float(r["entropy"])} for r in rows]
    nll = np.array([s["nll"] for s in samples])
    counts = np.array([s["num_tokens"] for s in samples], dtype=np.float64)
    settings_used = {"num_samples": gen.num_samples, "length": gen.length, "steps": gen.steps,
                     "sampler": gen.sampler, "top_p": gen.top_p, "dtype": gen.dtype, "stride": gen.stride,
                     "seed": gen.seed, "batch_size": gen.batch_size}
    total = float(counts.sum())
    return GenResult(gen_ppl=generative_perplexity(nll, counts) if total else math.nan,
                     gen_nll=float(nll.sum() / total) if total else math.nan,
                     entropy=float(np.mean([s["entropy"] for s in samples])), samples=samples,
                     evaluator=json.loads(str(rows[0]["evaluator"])), settings=settings_used,
                     forward_passes=float(np.mean([int(r["forward_passes"]) for r in rows])))


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class EvalRequest:
    """Everything ``pipelines/evaluate.py`` asks for."""

    model: str
    data: list[str] = field(default_factory=list)  # first: the model's own corpus; others: zero-shot
    nelbo: NelboSettings = field(default_factory=NelboSettings)
    gen: GenSettings = field(default_factory=GenSettings)
    output: str | None = None  # results JSON
    mlflow: bool = True
    run_id: str | None = None  # the training run to link to (default: found from a models:/ or runs:/ URI)
    runs_dir: str = "runs"  # local tracking store when MLFLOW_TRACKING_URI is unset (as the launcher)
    experiment: str = "mdlm-eval"  # used when no training run is known
    run_name: str | None = None

    def validate(self) -> None:
        if not str(self.model).strip():
            raise EvalInputError("--model: may not be empty")
        if not self.data and not self.gen.num_samples:
            raise EvalInputError("--data: nothing to evaluate (no data directory and --gen-samples 0)")
        self.nelbo.validate()
        self.gen.validate()
        names = [parse_data_spec(spec)[0] for spec in self.data]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EvalInputError(f"--data: two corpora are named {duplicates[0]!r}; name them with NAME=DIR")
        if self.output and Path(self.output).is_dir():
            raise EvalInputError(f"--output {self.output}: is a directory")


def metric_key(name: str) -> str:
    """A corpus name usable in MLflow metric keys."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)


def _model_fields(model: ModelInfo) -> dict[str, Any]:
    c = model.config
    return {"uri": model.uri, "local_dir": str(model.local_dir.absolute()), "model_type": model.model_type,
            "hidden_size": c.hidden_size, "n_layers": c.n_layers, "n_heads": c.n_heads, "vocab_size": c.vocab_size,
            "max_seq_len": c.max_seq_len, "noise": model.noise}


def prepare(request: EvalRequest, tracking_uri: str | None) -> tuple[ModelInfo, list[Corpus], Path | None]:
    """Every check that needs no Ray: the model, the corpora and their tokenizers, the evaluator and generation
    settings. Returns the model, the corpora and the local evaluator directory."""
    from mdlm.eval.evaluator import evaluator_kind, resolve_evaluator_dir

    request.validate()
    if tracking_uri is not None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # models:/ and runs:/ resolve against it
    model = inspect_model(request.model)
    corpora = [open_corpus(spec, request.nelbo.split, request.nelbo.max_rows) for spec in request.data]
    for corpus in corpora:
        check_compatible(model, corpus)
        _split_files(corpus)  # columns and row counts of the parquet files
    evaluator_dir = None
    gen = request.gen
    if gen.num_samples:
        if model.tokenizer_file is None:
            raise EvalInputError(f"--gen-samples: the model {model.uri} has no tokenizer.json to decode samples")
        length = gen.length or model.config.max_seq_len
        if length > model.config.max_seq_len and (not model.is_mdlm or gen.stride is None):
            raise EvalInputError(f"--gen-length: {length} exceeds the model's max_seq_len "
                                 f"{model.config.max_seq_len}" + ("; set --gen-stride for semi-autoregressive "
                                                                  "generation" if model.is_mdlm else ""))
        if gen.stride is not None and gen.stride >= model.config.max_seq_len:
            raise EvalInputError(f"--gen-stride: {gen.stride} must be below max_seq_len {model.config.max_seq_len}")
        if not model.is_mdlm and model.config.bos_token_id is None:
            raise EvalInputError(f"--gen-samples: the AR model {model.uri} has no bos_token_id to start from")
        evaluator_dir = resolve_evaluator_dir(gen.evaluator)  # type: ignore[arg-type]
        evaluator_kind(evaluator_dir, gen.evaluator)
    return model, corpora, evaluator_dir


def run_evaluation(request: EvalRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole evaluation; returns the results (also written to ``request.output`` and logged to MLflow).

    Bad input raises :class:`EvalInputError` before anything is written or any MLflow run is created."""
    from mdlm.eval import report
    from mdlm.runtime import init_ray

    started_at = time.perf_counter()
    uses_mlflow = request.mlflow or str(request.model).startswith(MLFLOW_SCHEMES) or \
        str(request.gen.evaluator or "").startswith(MLFLOW_SCHEMES)
    tracking_uri = report.tracking_uri(request.runs_dir) if uses_mlflow else None
    model, corpora, evaluator_dir = prepare(request, tracking_uri)
    parent = None
    if request.mlflow:
        parent = report.find_training_run(request.model, tracking_uri, request.run_id)  # type: ignore[arg-type]

    import ray

    timings: dict[str, float] = {}
    started = init_ray()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        model_ref = ray.put(read_dir_files(model.local_dir))
        corpus_results: list[CorpusResult] = []
        if corpora:
            log(f"evaluating {', '.join(f'{c.name} ({c.rows:,} rows)' for c in corpora)}: split "
                f"{request.nelbo.split}, K={request.nelbo.mc_samples}, {request.nelbo.num_actors} actor(s) max")
            start = time.perf_counter()
            corpus_results = nelbo_job(model_ref, corpora, request.nelbo)
            timings["nelbo"] = round(time.perf_counter() - start, 3)
        gen_result = None
        if request.gen.num_samples:
            log(f"generating {request.gen.num_samples} samples, scoring them with {request.gen.evaluator}")
            start = time.perf_counter()
            evaluator_ref = ray.put(read_dir_files(evaluator_dir))  # type: ignore[arg-type]
            gen_result = generation_job(model_ref, evaluator_ref, str(request.gen.evaluator), request.gen,
                                        request.nelbo)
            timings["generation"] = round(time.perf_counter() - start, 3)
    finally:
        if started:
            ray.shutdown()

    results = {
        "model": _model_fields(model),
        "training_run_id": parent.run_id if parent else None,
        "settings": {"split": request.nelbo.split, "mc_samples": request.nelbo.mc_samples,
                     "max_rows": request.nelbo.max_rows, "batch_size": request.nelbo.batch_size,
                     "num_actors": request.nelbo.num_actors, "device": request.nelbo.device,
                     "seed": request.nelbo.seed, "confidence": request.nelbo.confidence},
        "corpora": {r.name: {"role": "test" if i == 0 else "zero-shot", **r.to_dict(model.is_mdlm)}
                    for i, r in enumerate(corpus_results)},
        "generative": gen_result.to_dict() if gen_result else None,
        "seconds": {**timings, "total": round(time.perf_counter() - started_at, 3)},
    }
    if request.mlflow:
        report.log_evaluation_run(results, tracking_uri, parent, request)  # type: ignore[arg-type]
    if request.output:
        report.write_json_atomic(request.output, results)
    return results
