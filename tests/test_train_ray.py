"""Ray Train + FSDP2 (gloo, CPU) training runs on a small synthetic corpus: loss falls, checkpoints resume
exactly, a 2-worker checkpoint resumes on 1 worker, and MLflow holds the run and the registered model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mdlm import tracking
from mdlm.config import load_config
from mdlm.data.spec import DataSpec
from mdlm.train.launcher import TrainingError, fit, register_export, train
from mdlm.train.mfu import CEILING_KEY
from mdlm.train.spec import WorkerSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = DataSpec(vocab_size=64, mask_token_id=63, bos_token_id=0, eos_token_id=0, pad_token_id=0, block_size=16)


def _config(root: Path, name: str, *overrides: str):
    return load_config("cpu-ray", [
        "model.n_layers=2", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16", "model.dropout=0.0",
        "training.global_batch_size=16", "training.micro_batch_size=8", "training.lr=5e-3", "training.warmup_steps=2",
        "training.log_every=2", "training.ema_decay=0.9", f"run.storage_path={root / 'ray'}", f"run.name={name}",
        "run.shuffle_buffer=0", "run.eval_batches=4", f"run.registered_model=mdlm-{name}", *overrides])


def _datasets(ray):
    """A corpus a tiny model learns in a few steps: rows of one repeated token (5 or 7) with a random row mixed in."""
    rng = np.random.default_rng(0)
    distinct = np.stack([np.full(16, 5), np.full(16, 7), rng.integers(1, 63, 16)]).astype(np.int32)
    rows = [{"input_ids": distinct[i % 3]} for i in range(256)]
    ds = ray.data.from_items(rows)
    return {"train": ds, "validation": ds.limit(32)}


def _run(ray, config, root: Path):
    uri = tracking.default_tracking_uri(root)
    experiment = tracking.ensure_experiment(uri, "tests", root / "mlartifacts")
    run_id, _ = tracking.find_or_create_run(uri, experiment, config.run.name, str(root), config.flat())
    spec = WorkerSpec(config=config, data=DATA, export_dir=str(root / config.run.name / "model"),
                      has_validation=True, tracking_uri=uri, mlflow_run_id=run_id)
    result = fit(spec, _datasets(ray))  # the workers' part of launcher.train, then the driver's registration
    register_export(config, uri, run_id, spec.export_dir)
    return result, uri, run_id


def _history(uri, run_id, key):
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_worker_fsdp2_run_learns_and_is_tracked(ray_local, tmp_path):
    config = _config(tmp_path, "learn", "training.max_steps=30", "run.num_workers=2", "run.checkpoint_every=10",
                     "training.lr=1e-2")
    result, uri, run_id = _run(ray_local, config, tmp_path)
    assert result.metrics["step"] == 30
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(2, 31, 2))  # every logged step once, in order
    first, last = np.mean([v for _, v in losses[:3]]), np.mean([v for _, v in losses[-3:]])
    assert last < 0.8 * first, (first, last)
    assert _history(uri, run_id, "val_nelbo"), "no validation NELBO logged"
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "ppl_bound"):
        assert _history(uri, run_id, key), key

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["model.hidden_size"] == "32" and run.data.params["run.num_workers"] == "2"
    import mlflow

    with tracking.fluent_tracking_uri(uri):  # the user's tracking URI, then back
        local = mlflow.artifacts.download_artifacts("models:/mdlm-learn@current")
        assert (Path(local) / "MLmodel").is_file()  # an MLflow pyfunc model holding the export folder
        from mdlm.hub import resolve_model_dir

        assert sorted(p.name for p in resolve_model_dir(local).iterdir()) == ["README.md", "config.json",
                                                                              "model.safetensors"]
        import mdlm

        model = mdlm.load_pretrained(local)
        assert model.sample(2, 16, steps=8, seed=0).tokens.shape == (2, 16)
        by_uri = mdlm.load_pretrained("models:/mdlm-learn@current")
        for name, value in model.state_dict().items():
            assert torch.equal(value, by_uri.state_dict()[name])
        via_fsspec = mdlm.load_pretrained(f"file://{local}")
        assert via_fsspec.config == model.config
    checkpoint = Path(result.checkpoint.path)
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((checkpoint / "train_state.json").read_text())["progress"]["step"] == 30


def test_interrupted_run_resumes_to_the_same_parameters(ray_local, tmp_path):
    common = ("training.max_steps=8", "run.num_workers=1", "run.checkpoint_every=4")
    straight, _, _ = _run(ray_local, _config(tmp_path, "straight", *common), tmp_path)
    crashed, uri, run_id = _run(ray_local, _config(tmp_path, "crashed", *common, "run.fail_at_step=6",
                                                   "run.max_failures=1"), tmp_path)
    assert straight.metrics["step"] == crashed.metrics["step"] == 8
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Steps 5-6 of the crashed attempt were never logged: no step appears twice.
    assert [s for s, _ in _history(uri, run_id, "loss")] == [2, 4, 6, 8]
    # The matmul ceiling was measured once, by the first worker group, logged once and kept in the checkpoint;
    # the restarted group reused it: MFU has one denominator (tokens/s / MFU) before and after the restart.
    [(step, ceiling)] = _history(uri, run_id, CEILING_KEY)
    assert step == 0
    state = json.loads((Path(crashed.checkpoint.path) / "train_state.json").read_text())
    assert state["progress"]["extra"][CEILING_KEY]["flops"] == ceiling
    mfu, rate = dict(_history(uri, run_id, "mfu")), dict(_history(uri, run_id, "tokens_per_s"))
    denominators = [rate[s] / mfu[s] for s in (2, 4, 6, 8)]  # steps 2-4: first group; 6-8: after the restart
    assert denominators == pytest.approx([denominators[0]] * 4, rel=1e-9)


def test_two_worker_checkpoint_resumes_on_one_worker(ray_local, tmp_path):
    first, uri, run_id = _run(ray_local, _config(tmp_path, "reshard", "training.max_steps=4", "run.num_workers=2",
                                                 "run.checkpoint_every=2"), tmp_path)
    assert first.metrics["step"] == 4
    second, _, run_id_again = _run(ray_local, _config(tmp_path, "reshard", "training.max_steps=6",
                                                      "run.num_workers=1", "run.checkpoint_every=2"), tmp_path)
    assert run_id_again == run_id  # the same MLflow run continues
    assert second.metrics["step"] == 6
    state = json.loads((Path(second.checkpoint.path) / "train_state.json").read_text())
    assert state["progress"]["step"] == 6
    assert [p.name for p in Path(second.checkpoint.path).glob("*.distcp")] == ["__0_0.distcp"]
    assert [s for s, _ in _history(uri, run_id, "loss")] == [2, 4, 6]


def test_train_in_a_ray_working_dir_copy_warns_first(ray_local, tmp_path, monkeypatch, caplog):
    """``ray job submit --working-dir .``: the driver starts in Ray's unpacked copy; train() names the outputs
    that would land there before doing anything (here it then stops: the data is missing)."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_5a6b"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(logging.getLogger("mdlm"), "propagate", True)  # an earlier entry point may have unset it
    config = load_config("cpu-ray", ["run.name=wd", f"data.source={tmp_path / 'missing.txt'}"])
    with pytest.raises(TrainingError, match="no prepared data"):
        train(config)
    # a set: a handler an earlier in-process test left on the root logger can hand caplog the same record twice
    [warning] = {r.getMessage() for r in caplog.records if r.name == "mdlm.train.launcher" and r.levelname == "WARNING"}
    assert str(copy) in warning and f"run.storage_path: {copy / 'runs' / 'ray'}" in warning
    assert not (copy / "runs").exists()
