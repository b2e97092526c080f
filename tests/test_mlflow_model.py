"""The export as an MLflow 3 pyfunc model: logged from code (no pickle), with a signature and an input example,
a LoggedModel holding the run's metrics, registered with an alias, and
``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict([...])`` generating; the project's own loaders still
open ``models:/`` URIs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from mdlm import tracking
from mdlm.config import NoiseConfig, model_config_for
from mdlm.data.tokenizer import train_bpe
from mdlm.hub import resolve_model_dir
from mdlm.mlflow_model import PyfuncInputError, log_pyfunc_model
from mdlm.modeling import MDLM, load_pretrained
from tests.serve_support import SENTENCES

SAMPLING = {"steps": 16, "length": 0, "sampler": "cached", "top_p": 1.0}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-model")
    tokenizer = train_bpe(SENTENCES, 300)
    special = {name: tokenizer.token_to_id(token) for name, token in (("mask", "[MASK]"), ("bos", "[BOS]"))}
    config = model_config_for("cpu", vocab_size=tokenizer.get_vocab_size(), mask_token_id=special["mask"],
                              bos_token_id=special["bos"], max_seq_len=24, n_layers=1, hidden_size=32, n_heads=2,
                              cond_dim=16)
    torch.manual_seed(0)
    model = MDLM(config, noise=NoiseConfig(), tokenizer=tokenizer)
    model.save_pretrained(root / "export")
    uri = tracking.default_tracking_uri(root)
    experiment = tracking.ensure_experiment(uri, "pyfunc-tests", root / "mlartifacts")
    run_id = tracking.create_run(uri, experiment, "pyfunc", {"model.hidden_size": 32})
    logged = log_pyfunc_model(uri, run_id, root / "export", sampling=SAMPLING, metrics={"val_nelbo": 4.25},
                              registered_name="mdlm-pyfunc-test", alias="current")
    return {"root": root, "uri": uri, "run_id": run_id, "logged": logged, "model": model}


@pytest.fixture()
def tracking_uri(registered):
    with tracking.fluent_tracking_uri(registered["uri"]):  # and back, MLFLOW_TRACKING_URI included
        yield registered["uri"]


def test_registered_pyfunc_generates(registered, tracking_uri):
    assert registered["logged"]["version"] == "1"
    pyfunc = mlflow.pyfunc.load_model("models:/mdlm-pyfunc-test@current")
    texts = pyfunc.predict(["ROMEO.", "to be"], params={"steps": 8, "length": 20, "seed": 3})
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert texts[0].startswith("ROMEO.") and texts[1].startswith("to be")  # the prompt is the prefix
    again = pyfunc.predict(["ROMEO.", "to be"], params={"steps": 8, "length": 20, "seed": 3})
    assert again == texts  # seeded: reproducible
    # the same draws as the model's own generate (prompt i draws with seed + i)
    own = registered["model"].generate("to be", num_samples=1, length=20, steps=8, sampler="cached", seed=4)
    assert texts[1] == own[0]
    import pandas as pd

    assert pyfunc.predict(pd.DataFrame({"prompt": ["ROMEO."]}), params={"steps": 8, "seed": 3})[0].startswith("ROMEO.")


def test_bad_params_name_the_field(registered, tracking_uri):
    pyfunc = mlflow.pyfunc.load_model("models:/mdlm-pyfunc-test@current")
    with pytest.raises(PyfuncInputError, match="steps: must be in"):
        pyfunc.predict(["ROMEO."], params={"steps": 0})
    with pytest.raises(PyfuncInputError, match="sampler: 'bogus' is not one of"):
        pyfunc.predict(["ROMEO."], params={"sampler": "bogus"})
    with pytest.raises(PyfuncInputError, match=r"length: must be in \[1, 24\]"):
        pyfunc.predict(["ROMEO."], params={"length": 99})
    with pytest.raises(PyfuncInputError, match="prompts: give 1 to 64 prompts, got 65"):
        pyfunc.predict(["x"] * 65, params={})


def test_logged_model_is_code_with_signature_example_and_metrics(registered, tracking_uri):
    logged = registered["logged"]
    local = Path(mlflow.artifacts.download_artifacts(logged["model_uri"]))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    # a model from code: MLflow runs the copied file at load, nothing is unpickled
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / Path(flavor["model_code_path"]).name).is_file()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))
    inner = local / flavor["artifacts"]["model"]["path"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in inner.iterdir()}
    assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["outputs"]
    params = {p["name"]: p["default"] for p in yaml.safe_load(mlmodel["signature"]["params"])}
    assert params == {"steps": 16, "length": 0, "sampler": "cached", "top_p": 1.0, "seed": -1}
    assert (local / "serving_input_example.json").is_file()
    model = mlflow.get_logged_model(logged["model_id"])
    assert model.source_run_id == registered["run_id"]
    assert {m.key: m.value for m in model.metrics} == {"final_val_nelbo": 4.25}
    version = MlflowClient(tracking_uri).get_model_version_by_alias("mdlm-pyfunc-test", "current")
    assert version.run_id == registered["run_id"] and version.source == logged["model_uri"]


def test_project_loaders_open_the_mlflow_model(registered, tracking_uri):
    directory = resolve_model_dir("models:/mdlm-pyfunc-test@current")
    assert (directory / "config.json").is_file()
    loaded = load_pretrained("models:/mdlm-pyfunc-test@current")
    for name, tensor in registered["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
