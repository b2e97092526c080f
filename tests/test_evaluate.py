"""Batch evaluation on a real local Ray: the NELBO job against the library computed in-process on the same rows
and seeds, 1 vs 2 actors, zero-shot corpora, generative perplexity, the MLflow run linked to the training run,
and the CLI's bad-input cases (exit 2, field named, nothing written)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from mdlm import tracking
from mdlm.commands import evaluate as cli
from mdlm.config import ConfigError, DataConfig, load_config, model_config_for
from mdlm.data.pipeline import prepare_dataset
from mdlm.data.sources import shakespeare_documents
from mdlm.data.tokenizer import train_bpe
from mdlm.eval import EvalInputError
from mdlm.eval.evaluator import load_scorer
from mdlm.eval.metrics import row_generators, row_seed, sequence_nll, summarize_nelbo, unigram_entropy
from mdlm.eval.nelbo import nelbo_job, score_rows
from mdlm.eval.pool import read_dir_files
from mdlm.eval.run import prepare
from mdlm.eval.settings import EvalRequest, GenSettings, NelboSettings
from mdlm.modeling import MDLM, ARModel, load_pretrained
from tests.conftest import perturb_

pytestmark = pytest.mark.ray

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
ROWS, BATCH, SEED = 40, 8, 3


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """Two corpora prepared by the data pipeline with one tokenizer, a tiny MDLM and a tiny AR model."""
    root = tmp_path_factory.mktemp("eval")
    docs = [text for _, text in shakespeare_documents()[:4]]
    for name, part in (("a", docs[:2]), ("b", docs[2:])):
        (root / f"src-{name}").mkdir()
        for i, text in enumerate(part):
            (root / f"src-{name}" / f"{i}.txt").write_text(text[:12000])
    common = {"block_size": 32, "validation_fraction": 0.1, "test_fraction": 0.3, "max_document_chars": 800}
    a = prepare_dataset(DataConfig(source=str(root / "src-a"), tokenizer="bpe", tokenizer_vocab_size=300,
                                   output_dir=str(root / "a"), **common), progress=False)
    b = prepare_dataset(DataConfig(source=str(root / "src-b"), tokenizer=a.tokenizer_path,
                                   output_dir=str(root / "b"), **common), progress=False)
    assert a.rows("test") >= ROWS and b.rows("test") >= 1
    tokenizer = Tokenizer.from_file(a.tokenizer_path)
    fields = {"vocab_size": a.vocab_size, "mask_token_id": a.mask_token_id, "bos_token_id": a.bos_token_id,
              "eos_token_id": a.eos_token_id, "pad_token_id": a.pad_token_id, "max_seq_len": 32, "dropout": 0.0,
              "n_layers": 2, "hidden_size": 32, "n_heads": 2, "cond_dim": 16}
    perturb_(MDLM(model_config_for("cpu", **fields), tokenizer=tokenizer), scale=0.1).save_pretrained(root / "mdlm")
    perturb_(ARModel(model_config_for("cpu", kind="ar", **fields), tokenizer=tokenizer), scale=0.1, seed=1) \
        .save_pretrained(root / "ar")
    return {"root": root, "a": a, "b": b, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def registry(world, tmp_path_factory):
    """An MLflow sqlite store holding a 'training run' that logged and registered the MDLM."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "mdlm", root / "mlartifacts")
    run_id, _ = tracking.find_or_create_run(uri, experiment, "train-demo", str(root), {"model.hidden_size": 32})
    source = tracking.log_artifacts(uri, run_id, world["root"] / "mdlm", "model")
    tracking.register_model(uri, run_id, source, "mdlm-eval-test", "current")
    tracking.finish_run(uri, run_id)
    return {"uri": uri, "root": root, "run_id": run_id, "experiment": experiment}


def _rows(manifest, n: int | None = None) -> np.ndarray:
    table = pa.concat_tables([pq.read_table(f) for f in manifest.split_files("test")])
    ids = np.stack(table.column("input_ids").to_pylist())
    return ids[:n] if n else ids


@pytest.fixture(scope="module")
def one_actor(world):
    """The NELBO job on the first ROWS test rows of corpus a, K = 2, one actor."""
    import ray

    request = EvalRequest(model=str(world["root"] / "mdlm"), data=[str(world["root"] / "a")], mlflow=False,
                          nelbo=NelboSettings(mc_samples=2, max_rows=ROWS, batch_size=BATCH, num_actors=1, seed=SEED))
    model, corpora, _ = prepare(request)
    return nelbo_job(ray.put(read_dir_files(model.local_dir)), corpora, request.nelbo)[0]


def test_nelbo_job_equals_the_library_in_process(world, one_actor):
    model = load_pretrained(world["root"] / "mdlm")
    ids = _rows(world["a"], ROWS)
    assert one_actor.nll.shape == (ROWS, 2) and one_actor.num_tokens.tolist() == [32.0] * ROWS
    # The same rows, seeds and groups in-process: identical numbers.
    nll, tokens = score_rows(model, ids, None, np.arange(ROWS), mc_samples=2, seed=SEED, group_rows=BATCH)
    assert np.array_equal(one_actor.nll, nll) and np.array_equal(one_actor.num_tokens, tokens)
    assert one_actor.summary == summarize_nelbo(nll, tokens)
    # Row by row with sequence_nll and each row's own generator: equal up to batched-matmul rounding.
    single = np.concatenate([sequence_nll(model, torch.tensor(ids[i:i + 1]), mc_samples=2,
                                          generator=row_generators(SEED, [i]))[0].numpy() for i in range(ROWS)])
    np.testing.assert_allclose(one_actor.nll, single, rtol=1e-5)
    # ... and with K = 1, row i is the library's own loss with generator seed row_seed(SEED, i).
    k1, _ = score_rows(model, ids, None, np.arange(ROWS), mc_samples=1, seed=SEED, group_rows=BATCH)
    with torch.no_grad():
        losses = [model.loss(torch.tensor(ids[i:i + 1]), generator=torch.Generator().manual_seed(row_seed(SEED, i)))
                  .nll_sum.item() for i in range(ROWS)]
    np.testing.assert_allclose(k1[:, 0], losses, rtol=1e-5)
    summary = one_actor.summary
    assert summary.num_sequences == ROWS and summary.num_tokens == 32 * ROWS and summary.mc_samples == 2
    assert summary.ppl_low < summary.ppl < summary.ppl_high and summary.se > 0 and summary.mc_se > 0


def _bad(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "bad.json"
    try:
        code = cli.main([*args, f"eval.output={out}", "eval.mlflow=false"])
    except SystemExit as exc:  # a config error: the command exits as a script does
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists() and not list(tmp_path.glob(".bad.json*"))
    assert err.startswith(("error: ", "config error: ")) and err.count("\n") == 1, err
    return err


def test_cli_bad_input_exits_2_naming_the_field(world, registry, tmp_path, capsys, monkeypatch):
    root = world["root"]
    model, data = [f"eval.model={root / 'mdlm'}"], [f"eval.data=[{root / 'a'}]"]
    assert "eval.model" in _bad(capsys, tmp_path, f"eval.model={tmp_path / 'nope'}", *data)
    err = _bad(capsys, tmp_path, *model, f"eval.data={tmp_path / 'missing'}")
    assert "eval.data" in err and "prepare_data.py" in err
    assert "eval.nelbo.mc_samples" in _bad(capsys, tmp_path, *model, *data, "eval.nelbo.mc_samples=0")
    err = _bad(capsys, tmp_path, *model, *data, "eval.nelbo.split=dev")
    assert "eval.nelbo.split" in err and "'dev'" in err
    assert "eval.gen.evaluator" in _bad(capsys, tmp_path, *model, *data, "eval.gen.num_samples=2")
    err = _bad(capsys, tmp_path, *model, *data, "eval.gen.num_samples=2", f"eval.gen.evaluator={root / 'mdlm'}")
    assert "eval.gen.evaluator" in err and "masked diffusion" in err
    assert "eval.gen.sampler" in _bad(capsys, tmp_path, *model, *data, "eval.gen.num_samples=2",
                                      f"eval.gen.evaluator={root / 'ar'}", "eval.gen.sampler=greedy")
    assert "unknown config key 'eval.nelbo.mc_sample'" in _bad(capsys, tmp_path, *model, "eval.nelbo.mc_sample=2")
    # A model trained with another tokenizer of the same size, and one of another size.
    other = train_bpe([" ".join(f"An entirely different corpus of words, number {i}." for i in range(400))], 300)
    assert other.get_vocab_size() == 300  # the same size (save_pretrained refuses a tokenizer of another one)
    config = load_pretrained(root / "mdlm").config
    MDLM(config, tokenizer=other).save_pretrained(tmp_path / "other-tok")
    err = _bad(capsys, tmp_path, f"eval.model={tmp_path / 'other-tok'}", *data)
    assert "eval.data" in err and "differs" in err and str(tmp_path / "other-tok") in err
    MDLM(model_config_for("cpu", vocab_size=310, mask_token_id=309, max_seq_len=32)).save_pretrained(tmp_path / "v")
    err = _bad(capsys, tmp_path, f"eval.model={tmp_path / 'v'}", *data)
    assert "300 tokens" in err and "310" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    assert "eval.model models:/no-such-model@current" in _bad(capsys, tmp_path,
                                                              "eval.model=models:/no-such-model@current", *data)


def test_library_errors_name_settings_fields_and_the_config_tree_names_them_under_eval():
    cases = [(EvalRequest(model=" "), "model"), (EvalRequest(model="m"), "data"),
             (EvalRequest(model="m", data=["d"], nelbo=NelboSettings(mc_samples=0)), "nelbo.mc_samples"),
             (EvalRequest(model="m", data=["d"], nelbo=NelboSettings(num_actors=0)), "nelbo.num_actors"),
             (EvalRequest(model="m", data=["d"], gen=GenSettings(num_samples=2)), "gen.evaluator"),
             (EvalRequest(model="m", data=["d"], gen=GenSettings(num_samples=2, evaluator="e", batch_size=0)),
              "gen.batch_size"),
             (EvalRequest(model="m", data=["a=x", "a=y"]), "data")]
    for request, field in cases:
        with pytest.raises(EvalInputError) as info:
            request.validate()
        assert isinstance(info.value, ValueError) and info.value.field == field
        assert str(info.value).startswith(f"{field}: "), str(info.value)
    # The settings checks run when the config tree is loaded, named by their key in the tree.
    for override, key in [("eval.nelbo.mc_samples=0", "eval.nelbo.mc_samples"),
                          ("eval.gen.num_samples=2", "eval.gen.evaluator"),
                          ("eval.nelbo.device=tpu", "eval.nelbo.device"),
                          ("eval.model=' '", "eval.model"), ("eval.data=3", "eval.data")]:
        with pytest.raises(ConfigError) as info:
            load_config("cpu-ray", [override])
        assert str(info.value).startswith(f"{key}: "), str(info.value)
    config = load_config("cpu-ray", ["eval.data=[a, other=b]", "eval.nelbo.mc_samples=4", "eval.gen.seed=3"])
    assert config.eval.data == ["a", "other=b"] and config.eval.nelbo.mc_samples == 4 and config.eval.gen.seed == 3
    assert load_config("cpu-ray", ["eval.data=a"]).eval.data == ["a"]  # one directory needs no brackets
    assert load_config("cpu-ray").eval.data is None  # `mdlm evaluate` then takes the preset's data.output_dir
    assert "eval.nelbo.mc_samples" not in load_config("cpu-ray").flat()  # not a training run's parameter


def _hf_or_ar_evaluator(world, tmp_path) -> Path:
    if not HAS_TRANSFORMERS:
        return world["root"] / "ar"
    from tests.test_eval_metrics import make_hf_gpt2

    return make_hf_gpt2(tmp_path / "gpt2", world["tokenizer"], n_positions=16)


def test_cli_end_to_end_two_actors_zero_shot_generation_and_mlflow(world, registry, one_actor, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    evaluator = _hf_or_ar_evaluator(world, tmp_path)
    out = tmp_path / "results" / "eval.json"
    code = cli.main(["eval.model=models:/mdlm-eval-test@current", f"eval.data=[{world['root'] / 'a'}, "
                     f"other={world['root'] / 'b'}]", "eval.nelbo.mc_samples=2", f"eval.nelbo.max_rows={ROWS}",
                     f"eval.nelbo.batch_size={BATCH}", "eval.nelbo.num_actors=2", f"eval.nelbo.seed={SEED}",
                     "eval.gen.num_samples=5", "eval.gen.length=24", "eval.gen.steps=6", "eval.gen.batch_size=2",
                     "eval.gen.seed=1", f"eval.gen.evaluator={evaluator}", f"eval.output={out}",
                     f"eval.runs_dir={tmp_path / 'runs'}"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["corpora"]) == ["a", "other"] and "generative perplexity" in printed

    # Two actors give exactly the one-actor numbers.
    a = results["corpora"]["a"]
    assert a["role"] == "test" and a["metric"] == "nelbo"
    for key in ("nelbo", "se", "mc_se", "ppl", "ppl_low", "ppl_high", "num_tokens", "num_sequences"):
        assert a[key] == getattr(one_actor.summary, key), key

    # Zero-shot corpus: the library in-process on the same rows.
    model = load_pretrained(world["root"] / "mdlm")
    ids = _rows(world["b"], ROWS)
    nll, tokens = score_rows(model, ids, None, np.arange(len(ids)), mc_samples=2, seed=SEED, group_rows=BATCH)
    other = results["corpora"]["other"]
    assert other["role"] == "zero-shot" and other["nelbo"] == summarize_nelbo(nll, tokens).nelbo

    # Generative perplexity: the same samples in-process, scored by the same evaluator.
    gen = results["generative"]
    assert gen["num_samples"] == 5 and [s["index"] for s in gen["samples"]] == list(range(5))
    scorer = load_scorer(evaluator, name=str(evaluator))
    assert gen["evaluator"]["kind"] == scorer.kind
    bos = world["a"].bos_token_id
    expected = []
    for b, count in enumerate((2, 2, 1)):
        tokens_b = model.sample(count, 24, steps=6, prefix=[bos], seed=row_seed(1, b)).tokens
        expected += [(text, entropy) for text, entropy in
                     zip(model.decode(tokens_b), unigram_entropy(tokens_b[:, 1:])[0], strict=True)]
    assert [s["text"] for s in gen["samples"]] == [t for t, _ in expected]
    assert [s["entropy"] for s in gen["samples"]] == pytest.approx([e for _, e in expected])
    nll, counts = scorer.score_texts([t for t, _ in expected])
    assert [s["nll"] for s in gen["samples"]] == pytest.approx(nll.tolist(), rel=1e-5)
    assert gen["gen_ppl"] == pytest.approx(math.exp(nll.sum() / counts.sum()), rel=1e-5)
    assert gen["entropy"] == pytest.approx(np.mean([e for _, e in expected]))

    # MLflow: a child of the training run, in its experiment, with metrics and the JSON.
    from mlflow import MlflowClient

    client = MlflowClient(registry["uri"])
    run = client.get_run(results["mlflow"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == registry["run_id"] == results["training_run_id"]
    assert run.info.experiment_id == registry["experiment"] and run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test_nelbo"] == a["nelbo"] and metrics["test_nelbo_se"] == a["se"]
    assert metrics["test_ppl_bound"] == pytest.approx(a["ppl"])
    assert metrics["zeroshot/other/test_nelbo"] == other["nelbo"]
    assert metrics["gen_ppl"] == pytest.approx(gen["gen_ppl"]) and metrics["gen_entropy"] == gen["entropy"]
    assert run.data.params["eval.mc_samples"] == "2" and run.data.params["model"].startswith("models:/")
    artifact = client.download_artifacts(run.info.run_id, "evaluation/results.json", str(tmp_path))
    assert json.loads(Path(artifact).read_text()) == results
    assert str(registry["root"]) in run.info.artifact_uri  # the experiment's own location, not Ray's temp folders


def test_mlflow_training_run_lookup_and_standalone_evaluation_run(registry, tmp_path):
    from mlflow import MlflowClient

    from mdlm.eval import report

    uri, run_id = registry["uri"], registry["run_id"]
    for model_uri in ("models:/mdlm-eval-test@current", "models:/mdlm-eval-test/1", "models:/mdlm-eval-test/latest",
                      f"runs:/{run_id}/model"):
        assert report.find_training_run(model_uri, uri).run_id == run_id, model_uri
    assert report.find_training_run(str(tmp_path / "model"), uri) is None
    assert report.find_training_run(str(tmp_path / "model"), uri, run_id).experiment_id == registry["experiment"]
    with pytest.raises(EvalInputError, match="run_id 0123abcd: no such MLflow run") as info:
        report.find_training_run("models:/mdlm-eval-test@current", uri, "0123abcd")
    # The library names the field; the command prints it as its key in the config tree.
    assert info.value.field == "run_id"
    assert info.value.describe("eval.run_id").startswith("eval.run_id 0123abcd: no such MLflow run")
    # A plain model path and no run id: its own experiment, with an artifact location under the runs folder.
    summary = summarize_nelbo([[30.0], [36.0], [33.0]], [10, 12, 11])
    results = {"model": {"uri": str(tmp_path / "model"), "model_type": "ar"}, "settings": {"split": "test"},
               "corpora": {"c": {"role": "test", "split": "test", "metric": "nll", "data_dir": "/d",
                                 **summary.to_dict()}}, "generative": None}
    request = EvalRequest(model=str(tmp_path / "model"), runs_dir=str(tmp_path / "runs"))
    info = report.log_evaluation_run(results, uri, None, request)
    client = MlflowClient(uri)
    run = client.get_run(info["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "mdlm-eval" and "mlflow.parentRunId" not in run.data.tags
    assert experiment.artifact_location == (tmp_path / "runs" / "mlartifacts").absolute().as_uri()
    assert run.data.metrics["test_nll"] == summary.nelbo and run.data.metrics["test_ppl"] == summary.ppl
    assert "test_ppl_bound" not in run.data.metrics and run.data.metrics["test_tokens"] == 33
    # The results' bar chart, a PNG figure on the evaluation run.
    assert [a.path for a in client.list_artifacts(info["run_id"], "plots")] == ["plots/evaluation.png"]
    png = client.download_artifacts(info["run_id"], "plots/evaluation.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
