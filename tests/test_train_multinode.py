"""Training across Ray nodes: a 3-node Ray cluster on this machine (one raylet per node, as
``ray start --address`` would make), the two FSDP2 workers forced onto different nodes, gloo between them,
checkpoints on storage every node sees."""

from __future__ import annotations

import pytest

from tests.test_train_ray import _config, _history, _run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_two_nodes_train_and_checkpoint(ray_cluster, tmp_path):
    from ray.util.state import list_actors

    assert len([n for n in ray_cluster.nodes() if n["Alive"]]) == 3
    config = _config(tmp_path, "spread", "training.max_steps=12", "run.num_workers=2", "run.checkpoint_every=6",
                     "run.placement_strategy=STRICT_SPREAD", "training.lr=1e-2")
    result, uri, run_id = _run(ray_cluster, config, tmp_path)
    assert result.metrics["step"] == 12
    assert result.metrics["loss"] < 3.0  # untrained: about log(63) = 4.1 nats; the corpus is learned fast
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    nodes = {w.node_id for w in workers}
    assert len(workers) == 2 and len(nodes) == 2, [(w.actor_id, w.node_id) for w in workers]
    assert (tmp_path / "spread" / "model" / "model.safetensors").is_file()
    assert [step for step, _ in _history(uri, run_id, "loss")] == [2, 4, 6, 8, 10, 12]  # rank 0 logged to MLflow


def test_prepare_and_evaluate_on_three_one_cpu_nodes(ray_cluster, tmp_path):
    """Actor shares planned per node: on three 1-CPU nodes the tokenizer and evaluation actor pools take a share
    that leaves each node room for read tasks, so both finish (with shares from the cluster's total, 0.83-CPU
    actors filled every node and the 0.25-CPU read tasks fit nowhere: nothing progressed or failed)."""
    import logging
    import re
    import signal
    from dataclasses import replace

    from tokenizers import Tokenizer

    from mdlm.config import load_config
    from mdlm.data.pipeline import prepare_dataset
    from mdlm.data.spec import resolve_model_config
    from mdlm.eval.run import run_evaluation
    from mdlm.eval.settings import EvalRequest, NelboSettings
    from mdlm.modeling import build_model

    def hung(signum, frame):
        raise TimeoutError("no progress on three 1-CPU nodes")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(600)
    try:
        assert sorted(n["Resources"].get("CPU", 0) for n in ray_cluster.nodes() if n["Alive"]) == [1, 1, 1]
        config = load_config("cpu", ["data.max_files=6", "data.tokenizer_vocab_size=300", "data.num_workers=3",
                                     "data.validation_fraction=0.3", "model.n_layers=1", "model.hidden_size=32",
                                     "model.n_heads=2", "model.cond_dim=16"])
        said: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: said.append(record.getMessage())
        pipeline_logger = logging.getLogger("mdlm.data.pipeline")
        pipeline_logger.addHandler(handler)
        level = pipeline_logger.level
        pipeline_logger.setLevel(logging.INFO)
        try:
            manifest = prepare_dataset(replace(config.data, output_dir=str(tmp_path / "data")), progress=False)
        finally:
            pipeline_logger.removeHandler(handler)
            pipeline_logger.setLevel(level)
        planned = re.search(r"(\d+) read tasks on 3 workers x 0.75 CPU", " ".join(said))
        assert planned and int(planned.group(1)) >= 3  # every node's worker has a task
        assert manifest.rows("train") > 0 and manifest.rows("validation") > 0
        model = build_model(resolve_model_config(config.model, manifest.data_spec()), config.noise,
                            tokenizer=Tokenizer.from_file(manifest.tokenizer_path))
        model.save_pretrained(tmp_path / "model")
        request = EvalRequest(model=str(tmp_path / "model"), data=[str(tmp_path / "data")], mlflow=False,
                              runs_dir=str(tmp_path / "runs"),
                              nelbo=NelboSettings(split="validation", max_rows=48, batch_size=16, num_actors=3))
        corpus = next(iter(run_evaluation(request).to_dict()["corpora"].values()))
        assert corpus["num_tokens"] > 0 and 0 < corpus["nelbo"] < 10
    finally:
        signal.alarm(0)
