"""Prepare a corpus for training on Ray: read -> documents -> split -> tokenize -> pack -> parquet shards.

    manifest = prepare_dataset(config.data)      # or: python pipelines/prepare_data.py [a.b=value ...]

The driver plans and commits; the workers do every per-token step:

1. plan (driver, metadata only): the source's files (local paths, globs, ``file://``, ``s3://``, ``gs://`` ...) or
   a Hugging Face split's Arrow files are cut into read tasks of about 256 KiB-8 MiB
   (:func:`~mdlm.data.tasks.plan_tasks`); the plan depends on the corpus alone, not on the cluster.
2. tokenize (a pool of :class:`~mdlm.data.workers.PrepareWorker` actors, one tokenizer each): a task is read
   straight from its filesystem, cut into documents (:meth:`~mdlm.data.sources.SourceFile.documents`),
   assigned to train / validation / test by document key (seeded) and tokenized. ``pad`` rows are per document,
   so the task's shards are written there and then.
3. pack and write (``wrap``, the same pool): each split is one token stream in corpus order. The driver reads
   only each task's token counts, so it knows where every task starts in each stream; a task's worker then cuts
   the rows that start in it, with the first tokens of the next tasks to finish its last row
   (:func:`~mdlm.data.writer.wrap_rows`). The rows are exactly those of one sequential packer over the whole
   corpus, for any number of workers, and no tokens are lost at task boundaries (only the final remainder of
   each split, shorter than a row).
4. commit (driver): shards go to ``shards-<fingerprint>/`` under ``data.output_dir`` (a local path visible to
   every node, or any fsspec URL), each file published whole; then the tokenizer files, then ``manifest.json``,
   which lists every shard with its rows and SHA-256 and is the commit marker: readers trust only what it lists.
   A failure removes this run's shards (and a folder this run created), so nothing is published; earlier
   shard folders are removed once the new manifest is in place.

Token streams wait in Ray's object store between steps 2 and 3 only for a window of tasks (about twice the
pool), so memory stays flat as the corpus grows. Input errors (undecodable bytes, a missing jsonl field ...)
are raised on the driver as :class:`~mdlm.data.sources.DataError` with the worker's message intact.

``tokenizer=bpe`` is trained first, on the driver, by a pass over the training documents (Ray Data reads them);
pretrained tokenizers need no such pass. A rerun with the same inputs (config, source file names, sizes and
times, tokenizer, format version: the fingerprint) returns the existing dataset unless ``force``. What it does
is logged to ``logging.getLogger("mdlm.data.pipeline")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from mdlm.config import DataConfig
from mdlm.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    load_manifest,
)
from mdlm.data.sources import DataError, Source, resolve_source
from mdlm.data.splits import SPLITS, check_train_split
from mdlm.data.tasks import ReadTask, plan_tasks, task_documents
from mdlm.data.tokenizer import (
    PRETRAINED,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    SpecialTokens,
    load_tokenizer_for,
    save_tokenizer,
    special_tokens_for,
    tokenizer_identity,
    train_bpe,
)
from mdlm.data.workers import PrepareWorker
from mdlm.data.writer import first_error
from mdlm.runtime import READ_CPUS, actor_cpu_share, actors_that_fit, init_ray, node_cpus
from mdlm.storage import absolute, filesystem, is_local_fs, is_temporary, is_url, join, write_bytes_atomic

# Settings that change how the work runs, not what it produces: left out of the fingerprint.
EXECUTION_FIELDS = ("output_dir", "num_workers", "batch_size", "force")
SHARDS_PREFIX = "shards-"
TASKS_IN_FLIGHT_PER_WORKER = 2  # read-ahead: tokenized tasks waiting for their rows to be written
WORKER_RESTARTS = 4  # restarts of a preparation worker lost with its node (or killed)
STALL_WARNING_S = 60.0  # warn when no call has finished this long (a lost worker waiting for room?)

logger = logging.getLogger(__name__)

_DOC_SCHEMA = pa.schema([("text", pa.large_string()), ("split", pa.string()), ("error", pa.string())])


def fingerprint(config: DataConfig, source: Source) -> str:
    """Hash of what determines the output: the data config (less execution settings), the source files'
    names, sizes and modification times (or the Hugging Face dataset fingerprint), the tokenizer and the
    format version."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS}
    payload = {"format_version": FORMAT_VERSION, "config": settings, "source": source.identity(),
               "tokenizer": tokenizer_identity(config.tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------
# Documents as a Ray dataset (the bpe training pass; also what tests compare with the in-process path)


def _doc_table(texts: list[str], splits: list[str], error: str | None) -> pa.Table:
    if error is not None:
        texts, splits = [""], [""]
    errors = [error] * len(texts)
    return pa.Table.from_arrays([pa.array(texts, pa.large_string()), pa.array(splits, pa.string()),
                                 pa.array(errors, pa.string())], schema=_DOC_SCHEMA)


def task_documents_batch(batch: dict[str, np.ndarray], *, tasks: list[ReadTask], source: Source,
                         config: DataConfig, only_split: str | None = None) -> pa.Table:
    """Ray Data task: rows naming read tasks (``task``) -> their documents (``text``, ``split``, ``error``)."""
    tables = []
    for index in batch["task"]:
        docs = task_documents(tasks[int(index)], source, config, only_split)
        tables.append(_doc_table(docs.texts, docs.splits, docs.error))
    return pa.concat_tables(tables)


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # documents in corpus order
    ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def documents_dataset(source: Source, config: DataConfig, only_split: str | None = None):
    """The Ray dataset of documents (``text``, ``split``, ``error``), in corpus order (one Ray task per read task)."""
    import ray

    tasks = plan_tasks(source)
    ds = ray.data.from_items([{"task": t.index} for t in tasks], override_num_blocks=max(1, len(tasks)))
    return ds.map_batches(task_documents_batch, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
                          fn_kwargs={"tasks": tasks, "source": source, "config": config, "only_split": only_split})


def _train_tokenizer(source: Source, config: DataConfig) -> Tokenizer:
    """``bpe``: a byte-level BPE of ``tokenizer_vocab_size`` trained on the training documents only."""
    state = {"docs": 0, "error": None}

    def texts() -> Iterator[str]:
        for batch in documents_dataset(source, config, only_split="train").iter_batches(
                batch_size=None, batch_format="pyarrow"):
            state["error"] = first_error(batch)
            if state["error"]:
                return
            state["docs"] += batch.num_rows
            yield from batch["text"].to_pylist()

    tokenizer = train_bpe(texts(), config.tokenizer_vocab_size)
    if state["error"]:
        raise DataError(state["error"])
    if not state["docs"]:
        raise DataError(f"data.source={config.source!r}: no training documents (the corpus is empty)")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# The worker pool: tokenize every task, then (wrap) write the rows that start in each, in order


def _rows_after(position: int, tokens: int, chunk: int) -> int:
    """Tokens a task needs from the tasks after it to finish the last row that starts in it."""
    skip = (-position) % chunk
    if tokens <= skip:
        return 0
    starts = -(-(tokens - skip) // chunk)
    return max(0, skip + starts * chunk - tokens)


class _Pool:
    """Actors of :class:`PrepareWorker` and the calls in flight on each (new calls go to the least busy).

    A worker lost with its node (or killed) is restarted by Ray on a node with room, up to
    ``WORKER_RESTARTS`` times, and the calls it had in flight run again there; a task's stream held in the
    lost node's object store is rebuilt by running its ``tokenize`` call again (Ray's lineage reconstruction).
    Both calls are deterministic and a shard is published whole under a name fixed by its task, so a call
    that runs twice writes the same files. While no node has room for a restarting worker (a lost node not
    yet replaced), preparation waits for one, as a fixed-size training run does, and says so."""

    def __init__(self, workers: int, cpus: float, args: tuple) -> None:
        import ray

        remote = ray.remote(PrepareWorker)
        self.cpus = cpus
        # A call is retried until it succeeds or its worker is out of restarts (a bounded retry count would be
        # spent on the "temporarily unavailable" answers Ray gives until it has noticed that a node is gone).
        self.actors = [remote.options(num_cpus=cpus, max_restarts=WORKER_RESTARTS, max_task_retries=-1)
                       .remote(*args) for _ in range(workers)]
        self.load = [0] * workers
        self.inflight: dict[Any, tuple[str, int, int]] = {}

    def call(self, kind: str, task: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        actor = min(range(len(self.actors)), key=self.load.__getitem__)
        refs = getattr(self.actors[actor], method).options(num_returns=num_returns).remote(*args)
        first = refs[0] if num_returns > 1 else refs
        self.inflight[first] = (kind, task, actor)
        self.load[actor] += 1
        return refs

    def next_done(self) -> tuple[str, int, Any]:
        import ray

        while True:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=STALL_WARNING_S)
            if ready:
                break
            logger.warning(f"no preparation call has finished for {STALL_WARNING_S:.0f} s ({len(self.inflight)} "
                           f"in flight on {len(self.actors)} workers); a worker waiting for room (at the start, "
                           f"or restarting after its node was lost) goes on when a node with {self.cpus} free "
                           "CPUs joins")
        kind, task, actor = self.inflight.pop(ready[0])
        self.load[actor] -= 1
        return kind, task, ray.get(ready[0])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def run_pool(tasks: list[ReadTask], pool: _Pool, config: DataConfig, folder: str,
             timings: dict[str, float]) -> dict[str, SplitInfo]:
    """Tokenize every task on ``pool`` and (``wrap``) write each task's rows once the token counts before it and
    enough of the tokens after it are known; the driver handles counts and object references only."""
    wrap, chunk = config.packing == "wrap", config.block_size - 2
    summaries: dict[int, dict[str, Any]] = {}
    streams: dict[int, Any] = {}
    shards: dict[int, dict[str, list[dict[str, Any]]]] = {}
    position = dict.fromkeys(SPLITS, 0)
    window = TASKS_IN_FLIGHT_PER_WORKER * len(pool.actors)
    submitted = scheduled = 0  # tokenize calls made; tasks whose rows are written or on their way

    def following_needed(task: int) -> int | None:
        """How many tasks after ``task`` its rows need, or None while their token counts are unknown."""
        need = {s: _rows_after(position[s], summaries[task]["splits"][s]["tokens"], chunk) for s in SPLITS}
        j = task + 1
        while any(n > 0 for n in need.values()) and j < len(tasks):
            if j not in summaries:
                return None
            for s in SPLITS:
                need[s] -= summaries[j]["splits"][s]["tokens"]
            j += 1
        return j - task - 1

    while True:
        blocked = False
        while scheduled < len(tasks) and scheduled in summaries:
            if not wrap:
                shards[scheduled] = {s: summaries[scheduled]["splits"][s]["shards"] for s in SPLITS}
            else:
                after = following_needed(scheduled)
                if after is None:
                    blocked = True
                    break
                refs = [streams[scheduled + 1 + k] for k in range(after)]
                pool.call("write", scheduled, "write", scheduled, dict(position), streams.pop(scheduled), *refs)
                for s in SPLITS:
                    position[s] += summaries[scheduled]["splits"][s]["tokens"]
            scheduled += 1
        # Read ahead up to the window; past it only while the next write waits for later token counts.
        while submitted < len(tasks) and (submitted - scheduled < window or
                                          (blocked and all(t in summaries for t in range(scheduled, submitted)))):
            _, stream = pool.call("tokenize", submitted, "tokenize", tasks[submitted], num_returns=2)
            streams[submitted] = stream
            submitted += 1
            blocked = False
        if not pool.inflight:
            break
        kind, task, result = pool.next_done()
        if kind == "tokenize":
            if result["error"]:
                raise DataError(result["error"])
            summaries[task] = result
            if "first_rows" not in timings:
                timings["first_rows"] = time.perf_counter()
                timings["first_batch_rows"] = sum(v["documents"] for v in result["splits"].values())
            if not wrap:
                streams.pop(task, None)
        else:
            shards[task] = result
    if scheduled != len(tasks):
        raise RuntimeError(f"preparation stopped after {scheduled} of {len(tasks)} tasks")
    return _split_infos(tasks, summaries, shards, config, folder)


def _split_infos(tasks: list[ReadTask], summaries: dict[int, dict[str, Any]],
                 shards: dict[int, dict[str, list[dict[str, Any]]]], config: DataConfig,
                 folder: str) -> dict[str, SplitInfo]:
    infos = {}
    for split in SPLITS:
        listed = [ShardInfo(**shard) for t in range(len(tasks)) for shard in shards[t][split]]
        info = SplitInfo(path=f"{folder}/{split}", shards=listed, rows=sum(s.rows for s in listed),
                         tokens=sum(s.tokens for s in listed),
                         documents=sum(summaries[t]["splits"][split]["documents"] for t in range(len(tasks))))
        if config.packing == "wrap":
            stream = sum(summaries[t]["splits"][split]["tokens"] for t in range(len(tasks)))
            if info.rows != stream // (config.block_size - 2):
                raise RuntimeError(f"{split}: wrote {info.rows} rows of a {stream}-token stream")
            info.dropped_tokens = stream - info.rows * (config.block_size - 2)
        infos[split] = info
    return infos


# ---------------------------------------------------------------------------------------------------------
# The output: check, publish, clean up


def _ours(name: str) -> bool:
    """A name this pipeline writes into a dataset directory (besides the manifest)."""
    return name.startswith(SHARDS_PREFIX) or name in TOKENIZER_FILES


def _check_output_dir(fs, root: str, out: str) -> None:
    fs.invalidate_cache()
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise DataError(f"data.output_dir={out} exists and is not a directory; remove it or choose another one")
    # What an interrupted preparation leaves (its shard folder, the tokenizer files) is no reason to refuse.
    foreign = [e for e in fs.ls(root, detail=False) if not _ours(e.rstrip("/").rsplit("/", 1)[-1])]
    if foreign and not fs.exists(f"{root.rstrip('/')}/{MANIFEST_NAME}"):
        raise DataError(f"data.output_dir={out} exists and is not a prepared dataset (no {MANIFEST_NAME}); "
                        "remove it or choose another directory")


def _publish_tokenizer(tokenizer: Tokenizer, special: SpecialTokens, fs, root: str, block_size: int) -> list[str]:
    """The tokenizer files into ``root``, each published whole; their paths."""
    with tempfile.TemporaryDirectory(prefix="mdlm-tokenizer-") as tmp:
        save_tokenizer(tokenizer, tmp, special.role_ids(), model_max_length=block_size)
        paths = []
        for file in sorted(Path(tmp).iterdir()):
            paths.append(f"{root.rstrip('/')}/{file.name}")
            write_bytes_atomic(fs, paths[-1], file.read_bytes())
    return paths


def _remove(fs, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _remove_unlisted(fs, root: str, folder: str) -> None:
    """After a commit: earlier shard folders, the split folders of format-1 datasets, which nothing lists, and
    the temporary files of shard writes cut off by a lost worker (whose retry published the shard)."""
    fs.invalidate_cache()
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if (name.startswith(SHARDS_PREFIX) and name != folder) or name in SPLITS:
            _remove(fs, entry)
    if is_local_fs(fs):
        for path in Path(root, folder).rglob(".*"):
            if path.is_file() and is_temporary(path.name):
                path.unlink(missing_ok=True)


def _warn_if_not_shared(out: str) -> None:
    """A local output path is written by workers on every node: it must be one shared file system."""
    import ray

    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    if not is_url(out) and len(hosts) > 1:
        logger.warning(f"data.output_dir={out} is a local path on a cluster of {len(hosts)} hosts: workers on "
                       "every node write shards there, so it must be a shared file system (or use an s3:// or "
                       "gs:// URL)")


def prepare_dataset(config: DataConfig, *, force: bool | None = None, progress: bool = True) -> Manifest:
    """Prepare ``config.source`` into ``config.output_dir`` (local or a URL: the shards, tokenizer.json and the
    Hugging Face tokenizer files, manifest.json written last) and return its :class:`Manifest`; reuse an
    identical earlier output unless ``force``.

    Bad input raises :class:`DataError` (bad settings: ``ConfigError``; both ``ValueError``) and publishes
    nothing. (``progress`` is kept for callers; the pool logs its stages instead of drawing bars.)"""
    start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    config.validate("data")
    force = config.force if force is None else force
    out = absolute(config.output_dir) if is_url(config.output_dir) else \
        str(Path(config.output_dir).expanduser().absolute())
    fs, root = filesystem(out)
    source = resolve_source(config)
    tokenizer, special = load_tokenizer_for(config) if config.tokenizer != "bpe" else (None, None)
    digest = fingerprint(config, source)
    current = None
    with contextlib.suppress(FileNotFoundError, ManifestError):
        current = load_manifest(out, check_files=not force)
    if current is not None and not force and current.fingerprint == digest:
        logger.info(f"reusing {out} (same inputs and config, fingerprint {digest}); --force re-prepares it")
        current.reused = True
        return current
    _check_output_dir(fs, root, out)

    import ray

    folder = f"{SHARDS_PREFIX}{digest}"
    keep_folder = current is not None and any(f.startswith(f"{folder}/") for s in current.splits.values()
                                              for f in s.files)
    created = None
    if is_local_fs(fs):
        target = Path(root)
        created = next((p for p in [*target.parents[::-1], target] if not p.exists()), None)
    described = source.describe()
    logger.info(f"reading {config.source}: " + (f"{described['rows']:,} rows" if source.kind == "hf" else
                                                f"{described['files']} files, {described['bytes'] / 2**20:.1f} MB"))
    started = init_ray()
    committed, published = False, []
    try:
        if tokenizer is None:
            logger.info(f"training a byte-level BPE of {config.tokenizer_vocab_size} tokens on the training split")
            with _data_context(progress):
                tokenizer = _train_tokenizer(source, config)
            special = special_tokens_for(tokenizer, config.tokenizer)
        _warn_if_not_shared(out)
        tasks = plan_tasks(source)
        nodes = node_cpus()
        # Auto: one worker per CPU, no more than there are tasks, nor more than fit at half a CPU each on the
        # nodes beside their reserve (a 1-CPU node: one).
        workers = config.num_workers or max(1, min(int(sum(nodes)), actors_that_fit(nodes, READ_CPUS * 2),
                                                   len(tasks)))
        actor_cpus = actor_cpu_share(nodes, workers)
        row_bytes = config.block_size * (4 + (config.packing == "pad"))
        rows_per_file = max(1, int(config.file_size_mb * 2**20 // row_bytes))
        row_group_rows = max(1, min(rows_per_file, 8 * 2**20 // row_bytes))
        tokenizer_arg = config.tokenizer if config.tokenizer in PRETRAINED else tokenizer.to_str()
        logger.info(f"{len(tasks)} read tasks on {workers} workers x {actor_cpus} CPU, packing "
                    f"'{config.packing}' into {config.block_size}-token rows, shards to {join(out, folder)}")
        timings["tokenize_start"] = time.perf_counter()
        pool = _Pool(workers, actor_cpus, (source, config, tokenizer_arg, special, out, folder, rows_per_file,
                                           row_group_rows, config.batch_size))
        try:
            splits = run_pool(tasks, pool, config, folder, timings)
        finally:
            pool.close()
        check_train_split(config, splits["train"].documents, splits["train"].rows)
        for split, fraction in (("validation", config.validation_fraction), ("test", config.test_fraction)):
            if fraction > 0 and not splits[split].rows:
                logger.warning(f"the {split} split is empty (data.{split}_fraction={fraction} of "
                               f"{sum(i.documents for i in splits.values())} documents)")
        manifest = Manifest(
            format_version=FORMAT_VERSION, fingerprint=digest, source=described, tokenizer=config.tokenizer,
            tokenizer_file=TOKENIZER_FILE, vocab_size=special.vocab_size, mask_token_id=special.mask_id,
            bos_token_id=special.bos_id, eos_token_id=special.eos_id, pad_token_id=special.pad_id,
            block_size=config.block_size, packing=config.packing, splits=splits,
            config=dataclasses.asdict(config), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        published = _publish_tokenizer(tokenizer, special, fs, root, config.block_size)
        manifest.save(out)
        committed = True
    finally:
        if not committed:
            if not keep_folder:
                _remove(fs, f"{root.rstrip('/')}/{folder}")
            if current is None:
                for path in published:
                    _remove(fs, path)
            if created is not None and created.exists():
                with contextlib.suppress(OSError):
                    for path in [Path(root), *Path(root).parents]:
                        path.rmdir()  # only empty folders this call created
                        if path == created:
                            break
        if started:
            ray.shutdown()
    _remove_unlisted(fs, root, folder)
    manifest.root = out
    end = time.perf_counter()
    first = timings.get("first_rows", end)
    manifest.timings = {"total": end - start, "tokenize": end - timings.get("tokenize_start", start),
                        "first_rows": first - timings.get("tokenize_start", start), "after_first_rows": end - first,
                        "first_batch_documents": timings.get("first_batch_rows", 0),
                        "driver_cpu": time.process_time() - cpu_start}
    return manifest
