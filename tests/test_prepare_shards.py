"""Sharded preparation: workers tokenize, pack and write; the manifest, written last, is the commit marker.

Closed forms first: the rows that start in each task (given where it starts and what follows) put together are
exactly one sequential packer's rows, however the stream is cut. Then on a real local Ray: several read tasks
give byte-identical shards with 1 and 2 workers and the rows of the in-process reference; a failure publishes
nothing and leaves the previous dataset intact; a rebuild leaves one shard folder; a Hugging Face dataset is
read by the workers from its Arrow files; (writing to S3: tests/test_s3.py).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlm.config import DataConfig
from mdlm.data.local import prepare_in_memory
from mdlm.data.manifest import MANIFEST_NAME, ManifestError, load_manifest
from mdlm.data.packing import ArrayWrapPacker, WrapPacker, with_eos
from mdlm.data.pipeline import _rows_after, prepare_dataset
from mdlm.data.sources import DataError, Source, SourceFile, resolve_source, shakespeare_files
from mdlm.data.splits import SPLITS
from mdlm.data.tasks import MAX_TASK_BYTES, MIN_TASK_BYTES, plan_tasks, task_bytes
from mdlm.data.tokenizer import tokenizer_from_spec
from mdlm.data.writer import wrap_rows

BOS, EOS = 1, 2

# ---------------------------------------------------------------------------------------------------------
# Closed forms (no Ray)


def _cut(n: int, rng: random.Random, pieces: int) -> list[int]:
    """``pieces`` lengths summing to ``n``, some of them zero or shorter than a chunk."""
    cuts = sorted(rng.randrange(n + 1) for _ in range(pieces - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


@pytest.mark.parametrize("seed", range(6))
def test_rows_of_every_task_put_together_are_one_sequential_packers_rows(seed):
    rng = random.Random(seed)
    block = rng.choice([3, 5, 16, 64])
    lengths = np.array([rng.randrange(0, 90) for _ in range(rng.randrange(1, 60))])
    values = np.array([rng.randrange(3, 1000) for _ in range(int(lengths.sum()))], dtype=np.int32)
    stream = with_eos(values, lengths, EOS)
    expected = ArrayWrapPacker(block, BOS, EOS).add(values, lengths)
    sizes = _cut(len(stream), rng, rng.randrange(1, 12))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for t, size in enumerate(sizes):
        own = stream[starts[t]:starts[t + 1]]
        need = _rows_after(int(starts[t]), size, block - 2)
        after = stream[starts[t + 1]:]
        if rng.random() < 0.5:  # the driver passes only as many following tasks as needed: the same rows
            after = after[:need]
        assert need <= block - 3 and (need == 0 or need <= len(stream) - starts[t + 1] or t == len(sizes) - 1)
        rows.append(wrap_rows(int(starts[t]), own, after, block, BOS, EOS))
    together = np.concatenate(rows)
    assert together.shape == expected.shape == (len(stream) // (block - 2), block)
    assert (together == expected).all()
    listed = WrapPacker(block, BOS, EOS).add([list(values[a:b]) for a, b in
                                              zip(np.cumsum(lengths) - lengths, np.cumsum(lengths), strict=True)])
    assert together.tolist() == listed.input_ids


def test_tokens_needed_after_a_task():
    assert _rows_after(0, 25, 10) == 5  # rows start at 0, 10, 20; the last ends at 30
    assert _rows_after(7, 25, 10) == 8  # 3 tokens finish an earlier row; rows start at 3, 13, 23
    assert _rows_after(7, 3, 10) == 0 and _rows_after(7, 2, 10) == 0  # no row starts in the task
    assert _rows_after(0, 30, 10) == 0 and _rows_after(0, 0, 10) == 0


def test_the_task_plan_depends_on_file_sizes_only():
    rng = random.Random(0)
    sizes = [rng.choice([1, 10, 100, 400]) * 2**10 for _ in range(300)] + [20 * 2**20]
    files = [SourceFile(f"/c/{i}.txt", f"{i}.txt", "text", size, "0") for i, size in enumerate(sizes)]
    source = Source("c", "files", files)
    target = task_bytes(sum(sizes))
    assert target == min(MAX_TASK_BYTES, max(MIN_TASK_BYTES, sum(sizes) // 32))
    tasks = plan_tasks(source)
    assert [i for t in tasks for i in t.files] == list(range(len(files)))  # every file once, in order
    assert [t.index for t in tasks] == list(range(len(tasks)))
    for task in tasks[:-1]:
        total = sum(sizes[i] for i in task.files)
        closed_early = sizes[task.files[-1] + 1] >= target  # the next file is a task of its own
        assert (total >= target or closed_early) and total - sizes[task.files[-1]] < target
    assert tasks[-1].files == (len(files) - 1,)  # the 20 MiB file is a task of its own
    assert plan_tasks(Source("c", "files", list(files))) == tasks
    assert task_bytes(0) == MIN_TASK_BYTES and task_bytes(10**12) == MAX_TASK_BYTES


# ---------------------------------------------------------------------------------------------------------
# On Ray


def _config(source: str, out: Path, **changes) -> DataConfig:
    values = {"source": source, "tokenizer": "gpt2", "block_size": 64, "validation_fraction": 0.2,
              "test_fraction": 0.1, "max_document_chars": 3000, "file_size_mb": 0.02, "output_dir": str(out)}
    return DataConfig(**{**values, **changes})


def _rows(manifest, split: str) -> list:
    files = manifest.split_files(split)
    return pa.concat_tables([pq.read_table(f) for f in files])["input_ids"].to_pylist() if files else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 1.2 MB of the default corpus's text in 10 files: several read tasks."""
    root = tmp_path_factory.mktemp("shards-corpus")
    for path in shakespeare_files()[:10]:
        (root / path.name).write_bytes(path.read_bytes())
    return root


@pytest.fixture(scope="module")
def two_workers(ray_local, corpus, tmp_path_factory):
    config = _config(str(corpus), tmp_path_factory.mktemp("two") / "data", num_workers=2)
    return config, prepare_dataset(config, progress=False)


@pytest.mark.ray
def test_one_and_two_workers_write_the_same_shards_with_the_sequential_rows(two_workers, tmp_path):
    config, manifest = two_workers
    tasks = plan_tasks(resolve_source(config))
    assert len(tasks) >= 4
    names = {Path(f).name.split("-")[1] for f in manifest.split_files("train")}
    assert len(names) == len(tasks)  # every task wrote training shards
    one = prepare_dataset(DataConfig(**{**config.__dict__, "num_workers": 1, "batch_size": 5,
                                        "output_dir": str(tmp_path / "one")}), progress=False)
    assert one.splits == manifest.splits  # same shards: paths, rows, tokens, sizes, SHA-256
    for split in SPLITS:
        for a, b in zip(one.split_files(split), manifest.split_files(split), strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()
    reference = prepare_in_memory(config)  # one process, one sequential packer per split
    for split in SPLITS:
        assert _rows(manifest, split) == reference.input_ids[split].tolist(), split
        assert 0 <= manifest.splits[split].dropped_tokens < config.block_size - 2  # the final remainder only
    manifest.verify()
    assert manifest.timings["driver_cpu"] > 0


@pytest.mark.ray
def test_a_wait_without_progress_is_reported_and_the_run_goes_on(two_workers, tmp_path, monkeypatch, caplog):
    """The warning while no call finishes (a worker waiting for room) is said and does not stop the run: here
    with a threshold far below a call's time."""
    import logging

    from mdlm.data import pipeline

    config, manifest = two_workers
    monkeypatch.setattr(pipeline, "STALL_WARNING_S", 0.001)
    with caplog.at_level(logging.WARNING, logger="mdlm.data.pipeline"):
        again = prepare_dataset(DataConfig(**{**config.__dict__, "output_dir": str(tmp_path / "again")}),
                                progress=False)
    said = [r.getMessage() for r in caplog.records if "no preparation call has finished" in r.getMessage()]
    assert said and "goes on when a node with" in said[0]
    assert again.splits == manifest.splits


@pytest.mark.ray
def test_a_listed_shard_that_changed_is_named(two_workers, tmp_path):
    _, manifest = two_workers
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(manifest.root, copy)
    shard = manifest.splits["train"].shards[0]
    path = copy / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"part-00000-000\.parquet: its SHA-256 differs"):
        load_manifest(copy).verify()
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ManifestError, match=re.escape(f"lists {shard.path} with {shard.bytes} bytes")):
        load_manifest(copy)
    path.unlink()
    with pytest.raises(ManifestError, match=re.escape(f"lists {shard.path}, which is missing")):
        load_manifest(copy)


def _broken_corpus(corpus: Path, root: Path) -> Path:
    root.mkdir()
    for path in sorted(corpus.iterdir()):
        (root / path.name).write_bytes(path.read_bytes())
    (root / "zz_broken.txt").write_bytes(b"fine text\n\n" * 5000 + b"\xff\xfe bad")
    return root


@pytest.mark.ray
def test_a_failed_run_publishes_nothing_and_keeps_the_previous_dataset(ray_local, corpus, tmp_path):
    broken = _broken_corpus(corpus, tmp_path / "broken")
    fresh = tmp_path / "fresh" / "data"
    with pytest.raises(DataError, match=r"zz_broken\.txt: cannot decode byte 0xff at offset 55000"):
        prepare_dataset(_config(str(broken), fresh, num_workers=2), progress=False)
    assert not (tmp_path / "fresh").exists()  # nothing, not even the folders it created

    out = tmp_path / "kept" / "data"
    good = prepare_dataset(_config(str(corpus), out, num_workers=2), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"zz_broken\.txt"):
        prepare_dataset(_config(str(broken), out, num_workers=2), progress=False)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # not one new or changed file
    again = load_manifest(out)
    assert again.splits == good.splits
    again.verify()


@pytest.mark.ray
def test_a_rebuild_leaves_one_shard_folder(ray_local, corpus, tmp_path):
    out = tmp_path / "data"
    first = prepare_dataset(_config(str(corpus), out, max_files=3), progress=False)
    second = prepare_dataset(_config(str(corpus), out, max_files=3, block_size=32), progress=False)
    assert first.fingerprint != second.fingerprint
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, f"shards-{second.fingerprint}", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json"])
    assert load_manifest(out).block_size == 32


@pytest.mark.ray
def test_a_hugging_face_dataset_is_read_by_the_workers(ray_local, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = random.Random(3)
    words = shakespeare_files()[0].read_text().split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randrange(20, 120))) if i % 17 else ""}
            for i in range(3000)]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(f"hf:{folder}", tmp_path / "out", validation_fraction=0.0, test_fraction=0.0,
                     num_workers=2)
    source = resolve_source(config)
    assert len(plan_tasks(source)) >= 3 and all(os.path.isfile(path) for path, _, _ in source.hf_files)
    assert len(pickle.dumps(source)) < 2000 < source.num_bytes  # the rows stay in the Arrow files
    manifest = prepare_dataset(config, progress=False)
    gpt2 = tokenizer_from_spec("gpt2")
    ids = [e.ids for e in gpt2.encode_batch([r["text"] for r in rows if r["text"]], add_special_tokens=False)]
    assert _rows(manifest, "train") == WrapPacker(64, 50256, 50256).add(ids).input_ids
    assert manifest.source["rows"] == 3000


@pytest.mark.ray
def test_what_an_interrupted_run_left_is_never_listed_and_is_removed(ray_local, corpus, tmp_path):
    """A driver killed before its manifest leaves its shard folder (and maybe the tokenizer files): no manifest
    lists them, the next preparation into the directory is not refused and removes them."""
    out = tmp_path / "data"
    stale = out / "shards-0123456789abcdef0123" / "train"
    stale.mkdir(parents=True)
    (stale / "part-00000-000.parquet").write_bytes(b"half a file")
    (out / "tokenizer.json").write_text("{}")
    manifest = prepare_dataset(_config(str(corpus), out, max_files=2), progress=False)
    assert not stale.parent.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shards-")) == [f"shards-{manifest.fingerprint}"]
    load_manifest(out).verify()
    (out / "notes.txt").write_text("not ours")
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(DataError, match="exists and is not a prepared dataset"):
        prepare_dataset(_config(str(corpus), out, max_files=2), progress=False)


def test_temporary_files_of_cut_off_writes_are_removed_after_the_commit(tmp_path):
    """A writer killed mid-write (its node lost) leaves write_bytes_atomic's temporary file; the retried call
    publishes the shard, and the cleanup after the commit removes the leftover, nothing else."""
    from mdlm.data.pipeline import _remove_unlisted
    from mdlm.storage import filesystem, is_temporary, write_bytes_atomic

    fs, root = filesystem(str(tmp_path))
    shard = tmp_path / "shards-abc" / "train" / "part-00000-000.parquet"
    write_bytes_atomic(fs, str(shard), b"rows")
    leftover = shard.parent / f".{shard.name}.tmp-123-0123abcd"
    leftover.write_bytes(b"half")
    assert is_temporary(leftover.name) and not is_temporary(shard.name) and not is_temporary(".hidden")
    (tmp_path / "shards-abc" / ".hidden").write_text("not ours")
    _remove_unlisted(fs, root, "shards-abc")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".hidden", "part-00000-000.parquet"]
