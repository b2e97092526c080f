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
