"""Object storage for real: a moto S3 server on 127.0.0.1 (tests/s3_support.py), configured only through the
standard AWS variables, as README tells users. Preparing a corpus read from ``s3://`` gives the same rows as the
same files read locally; a model directory on ``s3://`` loads and generates."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mdlm.config import DataConfig
from mdlm.data.manifest import MANIFEST_NAME, load_manifest
from mdlm.data.pipeline import prepare_dataset
from mdlm.data.sources import DataError, shakespeare_files
from mdlm.modeling import load_pretrained
from tests.s3_support import s3_server
from tests.serve_support import make_model_dir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server, server.environment():
        yield server


def _rows(manifest, split: str) -> list:
    files = manifest.split_files(split)
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()["input_ids"] if files else []


def test_prepare_reads_a_corpus_from_s3(s3, tmp_path: Path, ray_local):
    local = tmp_path / "corpus"
    local.mkdir()
    for i in range(6):
        (local / f"part{i}.txt").write_text("\n\n".join(f"Paragraph {i}.{j}: the quality of mercy is not "
                                                        f"strained, it droppeth {j * i} times." for j in range(20)))
    fs, _ = fsspec.core.url_to_fs(s3.url())
    fs.put(str(local) + "/", s3.url("corpus/"), recursive=True)
    assert sorted(k for k in s3.keys("corpus/")) == [f"corpus/part{i}.txt" for i in range(6)]
    settings = {"tokenizer": "gpt2", "block_size": 32, "validation_fraction": 0.2, "test_fraction": 0.1}
    remote = prepare_dataset(DataConfig(source=s3.url("corpus"), output_dir=str(tmp_path / "from-s3"), **settings),
                             progress=False)
    here = prepare_dataset(DataConfig(source=str(local), output_dir=str(tmp_path / "from-disk"), **settings),
                           progress=False)
    assert remote.rows("train") > 0
    for split in ("train", "validation", "test"):
        assert _rows(remote, split) == _rows(here, split), split
    assert remote.source["spec"] == "s3://mdlm/corpus" and remote.source["files"] == 6


def test_prepare_names_a_missing_s3_source(s3, tmp_path: Path, ray_local):
    with pytest.raises(ValueError, match="s3://mdlm/nothing-here"):
        prepare_dataset(DataConfig(source=s3.url("nothing-here"), tokenizer="gpt2",
                                   output_dir=str(tmp_path / "out")), progress=False)
    assert not (tmp_path / "out").exists()


def test_model_directory_on_s3_loads_and_generates(s3, tmp_path: Path):
    folder = make_model_dir(tmp_path / "model")
    fs, _ = fsspec.core.url_to_fs(s3.url())
    fs.put(str(folder) + "/", s3.url("models/demo/"), recursive=True)
    remote = load_pretrained(s3.url("models/demo"))
    local = load_pretrained(folder)
    for a, b in zip(remote.state_dict().values(), local.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    out = remote.sample(num_samples=2, length=16, steps=8, seed=3)
    assert torch.equal(out.tokens, local.sample(num_samples=2, length=16, steps=8, seed=3).tokens)


def _broken_corpus(root: Path, good: Path) -> Path:
    root.mkdir()
    for path in sorted(good.iterdir()):
        (root / path.name).write_bytes(path.read_bytes())
    (root / "zz_broken.txt").write_bytes(b"fine text\n\n" * 5000 + b"\xff\xfe bad")
    return root


def test_workers_write_shards_to_s3_and_the_manifest_commits_them(s3, tmp_path: Path, ray_local):
    """data.output_dir=s3://...: the workers write the shards to the bucket, the manifest (written last) lists
    them; the same shards as on disk; training's reader opens them; a failed run leaves no object."""
    import ray

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in shakespeare_files()[:6]:
        (corpus / path.name).write_bytes(path.read_bytes())
    settings = {"source": str(corpus), "tokenizer": "gpt2", "block_size": 64, "validation_fraction": 0.2,
                "test_fraction": 0.1, "file_size_mb": 0.02, "num_workers": 2}
    local = prepare_dataset(DataConfig(output_dir=str(tmp_path / "local"), **settings), progress=False)
    url = s3.url("prepared/shakespeare")
    remote = prepare_dataset(DataConfig(output_dir=url, **settings), progress=False)
    assert len({Path(f).name.split("-")[1] for f in remote.split_files("train")}) >= 3  # several read tasks
    assert remote.root == url and remote.splits == local.splits  # the same shards, byte for byte
    keys = s3.keys("prepared/shakespeare/")
    listed = {f"prepared/shakespeare/{s.path}" for split in remote.splits.values() for s in split.shards}
    assert set(keys) - listed == {f"prepared/shakespeare/{name}" for name in (
        MANIFEST_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    assert listed <= set(keys)
    loaded = load_manifest(url)
    assert loaded.splits == local.splits and loaded.split_files("train")[0].startswith("s3://mdlm/")
    loaded.verify()
    assert prepare_dataset(DataConfig(output_dir=url, **settings), progress=False).reused
    # What training reads: Ray Data straight from the bucket, through the same standard variables.
    assert ray.data.read_parquet(loaded.split_files("train")).count() == local.rows("train")

    broken = _broken_corpus(tmp_path / "broken", corpus)
    with pytest.raises(DataError, match=r"zz_broken\.txt"):
        prepare_dataset(DataConfig(output_dir=s3.url("prepared/broken"), **{**settings, "source": str(broken)}),
                        progress=False)
    assert s3.keys("prepared/broken") == []  # no stray objects


def test_the_whole_pipeline_on_s3(s3, tmp_path: Path, ray_local, monkeypatch):
    """Corpus, prepared data, checkpoints, export and MLflow artifacts all on the S3 server, configured by the
    standard variables and s3:// paths only: prepare -> train -> resubmit the same run name (resumes from the
    checkpoint on S3) -> export and register -> models:/NAME@ALIAS loads and generates."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    from mdlm.config import load_config
    from mdlm.train.launcher import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    fs, _ = fsspec.core.url_to_fs(s3.url())
    for i, path in enumerate(shakespeare_files()[:3]):
        fs.pipe_file(s3.url(f"pipeline/corpus/{i}.txt"), path.read_bytes())
    overrides = [f"data.source={s3.url('pipeline/corpus')}", f"data.output_dir={s3.url('pipeline/prepared')}",
                 "data.tokenizer=bpe", "data.tokenizer_vocab_size=300", "data.block_size=32",
                 f"run.storage_path={s3.url('pipeline/runs')}", "run.name=s3run", "run.registered_model=mdlm-s3",
                 "run.num_workers=1", "run.checkpoint_every=2", "run.eval_batches=1", "model.n_layers=1",
                 "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16", "training.global_batch_size=8",
                 "training.micro_batch_size=8", "training.log_every=1", "training.warmup_steps=1",
                 "sampling.steps=4", "sampling.num_samples=1"]
    prepared = prepare_dataset(load_config("cpu-ray", overrides).data, progress=False)
    assert prepared.root == s3.url("pipeline/prepared") and prepared.rows("train") > 0

    first = train(load_config("cpu-ray", [*overrides, "training.max_steps=4"]))
    assert first.metrics["step"] == 4 and first.export_dir == s3.url("pipeline/runs/s3run/model")
    checkpoints = {k.split("/")[3] for k in s3.keys("pipeline/runs/s3run/") if "/checkpoint_" in k}
    assert len(checkpoints) >= 1

    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    loop_logger = logging.getLogger("mdlm.train.loop")
    loop_logger.addHandler(handler)
    level = loop_logger.level
    loop_logger.setLevel(logging.INFO)
    try:
        second = train(load_config("cpu-ray", [*overrides, "training.max_steps=6"]))
    finally:
        loop_logger.removeHandler(handler)
        loop_logger.setLevel(level)
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["step"] == 6
    resumed = [m for m in said if m.startswith("resumed from ")]
    assert resumed and "mdlm/pipeline/runs/s3run/checkpoint_" in resumed[0] and resumed[0].endswith("at step 4")
    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")]
    assert steps == list(range(1, 7))  # every step once, across the resubmission

    keys = s3.keys("pipeline/runs/")
    assert "pipeline/runs/s3run/model/model.safetensors" in keys
    assert any(k.startswith("pipeline/runs/mlartifacts/") and k.endswith("/artifacts/model/model.safetensors")
               for k in keys)  # the registered model's artifacts live on S3 too
    version = client.get_model_version_by_alias("mdlm-s3", "current")
    assert str(version.version) == "2"  # registered by each of the two submissions
    predicted = mlflow.pyfunc.load_model("models:/mdlm-s3@current").predict(
        ["ROMEO."], params={"steps": 4, "length": 16, "seed": 0})
    assert len(predicted) == 1 and predicted[0].startswith("ROMEO.") and len(predicted[0]) > len("ROMEO.")
    model = load_pretrained("models:/mdlm-s3@current")
    assert model.generate("ROMEO.", num_samples=1, length=16, steps=4, seed=0)[0].startswith("ROMEO.")
