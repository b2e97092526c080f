"""Node loss, for real: a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one raylet per
node). Two workers, one per node; the node holding the second worker is removed mid-run (its raylet killed, as when
a machine is lost). Ray Train restarts the worker group from the latest checkpoint and the run finishes its steps,
the MLflow run complete with every step once, the export and the registered model in place:

- fixed size (``run.num_workers=2``): a fresh node joins, as a cluster's autoscaler replaces it, and the run goes
  on with 2 workers;
- elastic (``run.min_workers=1``): no node replaces it and the run goes on with the 1 worker that fits, with the
  same global batch (2 micro-batches per step instead of 1), the same step count and the same data order.

Preparation too: four prepare workers on the two nodes, the worker node lost early in the run and replaced; the
dataset published is the undisturbed run's, shard for shard.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from mdlm.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, EVERY = 24, 4


def _committed_step(run_dir) -> int:
    """The step of the latest checkpoint Ray Train registered (its controller's snapshot; 0: none yet). A checkpoint
    folder alone can be one still being reported, which a lost node leaves uncommitted, and registration lags the
    report by the controller's polling."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


@pytest.fixture()
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker_node = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster, worker_node
    ray.shutdown()
    cluster.shutdown()


def _lose_a_node_mid_run(two_nodes, tmp_path, monkeypatch, name: str, overrides: list[str], replace: bool):
    """Train, lose the node of the worker not on the head after the first registered checkpoint (and add a
    replacement when ``replace``); returns ``(result, rank 0's log lines, the step of the latest checkpoint Ray
    Train had registered when the node was lost)``."""
    from ray.util.state import list_actors

    from mdlm.train.launcher import train

    cluster, worker_node = two_nodes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config("cpu-ray", [
        "model.n_layers=1", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16", "model.dropout=0.0",
        "training.global_batch_size=16", "training.micro_batch_size=8", f"training.max_steps={STEPS}",
        "training.log_every=1", "training.warmup_steps=2", f"data.output_dir={tmp_path / 'data'}",
        "data.max_files=2", "data.tokenizer=bpe", "data.tokenizer_vocab_size=300", "data.block_size=32",
        f"run.storage_path={tmp_path / 'ray'}", f"run.name={name}", "run.num_workers=2",
        f"run.checkpoint_every={EVERY}", "run.eval_batches=1", "run.shuffle_buffer=0", "run.max_failures=3",
        f"run.registered_model=mdlm-{name}", "sampling.steps=4", "sampling.num_samples=1", *overrides])
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    loop_logger = logging.getLogger("mdlm.train.loop")
    loop_logger.addHandler(handler)
    level = loop_logger.level
    loop_logger.setLevel(logging.INFO)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(config)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 400
        while not _committed_step(tmp_path / "ray" / name):
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.5)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                              detail=True, limit=100)
        assert len(workers) == 2 and worker_node.node_id in {w.node_id for w in workers}
        assert "2 workers x 1 micro-batches of 8 rows = global batch 16" in said
        committed = _committed_step(tmp_path / "ray" / name)
        cluster.remove_node(worker_node, allow_graceful=False)
        if replace:
            cluster.add_node(num_cpus=2)
        thread.join(timeout=600)
    finally:
        loop_logger.removeHandler(handler)
        loop_logger.setLevel(level)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    return outcome["result"], said, committed


def _check_the_run(result, said: list[str], committed: int, registered: str) -> None:
    from mlflow import MlflowClient

    from mdlm.modeling import load_pretrained

    assert result.metrics["step"] == STEPS
    [resumed] = {m for m in said if m.startswith("resumed from ")}  # one restart (a record may be relayed twice)
    resumed_at = int(resumed.rsplit(" ", 1)[1])
    # Resumed from a checkpoint at least as late as the latest one registered when the node was lost: only the
    # steps after it ran twice (the interval in progress, and any checkpoint Ray Train had not yet registered).
    assert resumed_at % EVERY == 0 and resumed_at >= committed >= EVERY
    client = MlflowClient()
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert steps == list(range(1, STEPS + 1))  # every step once, though steps after the checkpoint ran twice
    assert load_pretrained(result.export_dir).config.max_seq_len >= 32
    assert str(client.get_model_version_by_alias(registered, "current").version) == "1"


def test_a_run_survives_the_loss_of_a_node(two_nodes, tmp_path, monkeypatch):
    """Workers of 1 CPU on 2-CPU nodes, spread one per node; a replacement node joins."""
    import ray

    result, said, committed = _lose_a_node_mid_run(
        two_nodes, tmp_path, monkeypatch, "nodeloss", ["run.cpus_per_worker=1", "run.placement_strategy=STRICT_SPREAD"],
        replace=True)
    _check_the_run(result, said, committed, "mdlm-nodeloss")
    assert not {m for m in said if m.startswith("1 worker ")}  # the group kept its size
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_an_elastic_run_goes_on_with_the_workers_that_fit(two_nodes, tmp_path, monkeypatch):
    """Workers of 1.5 CPU: one fits on each 2-CPU node; after the loss only the head's remains."""
    result, said, committed = _lose_a_node_mid_run(
        two_nodes, tmp_path, monkeypatch, "elastic", ["run.min_workers=1", "run.cpus_per_worker=1.5"], replace=False)
    _check_the_run(result, said, committed, "mdlm-elastic")
    assert "1 worker x 2 micro-batches of 8 rows = global batch 16" in said  # the same global batch, resized


def _corpus(root, copies: int):
    """``copies`` x the default corpus's first 20 works, each copy its own files: many read tasks."""
    from mdlm.data.sources import shakespeare_files

    root.mkdir()
    for k in range(copies):
        for path in shakespeare_files()[:20]:
            (root / f"{k}-{path.name}").write_bytes(path.read_bytes())
    return root


def test_preparation_survives_the_loss_of_a_node(two_nodes, tmp_path):
    """Four preparation workers on two nodes; the worker node is lost once the first shards are written (its
    workers' calls in flight and the token streams in its object store with it) and a replacement joins: Ray
    restarts the workers, retries their calls and rebuilds the lost streams, and the dataset published is the
    one an undisturbed run publishes, shard for shard."""
    from ray.util.state import list_actors

    from mdlm.config import DataConfig
    from mdlm.data.manifest import load_manifest
    from mdlm.data.pipeline import prepare_dataset

    cluster, worker_node = two_nodes
    corpus = _corpus(tmp_path / "corpus", copies=3)

    def config(out: str) -> DataConfig:
        return DataConfig(source=str(corpus), tokenizer="gpt2", block_size=64, packing="wrap",
                          validation_fraction=0.1, test_fraction=0.1, file_size_mb=0.05, num_workers=4,
                          output_dir=str(tmp_path / out))

    reference = prepare_dataset(config("reference"), progress=False)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["manifest"] = prepare_dataset(config("data"), progress=False)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "data").glob("shards-*/train/*.parquet")):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    workers = list_actors(filters=[("class_name", "=", "PrepareWorker"), ("state", "=", "ALIVE")], detail=True,
                          limit=100)
    on_lost = [w.actor_id for w in workers if w.node_id == worker_node.node_id]
    assert on_lost, [(w.actor_id, w.node_id) for w in workers]
    written = len(list((tmp_path / "data").glob("shards-*/*/*.parquet")))
    cluster.remove_node(worker_node, allow_graceful=False)
    cluster.add_node(num_cpus=2)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert not outcome["manifest"].reused
    restarted = list_actors(filters=[("class_name", "=", "PrepareWorker")], detail=True, limit=100)
    assert all(a.num_restarts >= 1 for a in restarted if a.actor_id in on_lost)  # restarted, not replaced

    published = load_manifest(str(tmp_path / "data"))
    published.verify()
    assert written < sum(len(s.shards) for s in reference.splits.values()) / 2, written  # lost early in the run
    for split in ("train", "validation", "test"):
        ours, theirs = published.splits[split], reference.splits[split]
        assert (ours.rows, ours.tokens, ours.documents) == (theirs.rows, theirs.tokens, theirs.documents)
        assert [(s.rows, s.sha256) for s in ours.shards] == [(s.rows, s.sha256) for s in theirs.shards]
    assert not [p for p in (tmp_path / "data").rglob(".*") if p.is_file()]  # no temporary file left behind
