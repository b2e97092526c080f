"""Continuous batching (mdlm.serve.continuous) without Ray or HTTP: requests with different lengths, steps,
samplers and seeds share forward passes, join a running batch and leave it when done, keep their seeded tokens,
respect the row cap, and one failing pass fails only its own requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mdlm.config import ConfigError
from mdlm.modeling import load_pretrained
from mdlm.serve.continuous import StepBatcher
from mdlm.serve.engine import Engine
from mdlm.serve.schemas import GenerateRequest
from mdlm.serve.settings import serve_config_from_dict
from tests.serve_support import make_model_dir

MIXED = [  # different lengths, steps, samplers and seeds; one semi-autoregressive, one infill
    GenerateRequest(prompt="To be", length=32, steps=40, sampler="ancestral", seed=1, num_samples=2),
    GenerateRequest(prompt="Now is", length=20, steps=10, sampler="cached", seed=2),
    GenerateRequest(length=32, sampler="first_hitting", seed=3, num_samples=3),
    GenerateRequest(prompt="The", length=16, steps=16, sampler="remdm", seed=4, num_samples=2),
    GenerateRequest(prompt="All the", length=24, steps=8, sampler="confidence_k", seed=5),
    GenerateRequest(prompt="The", length=56, stride=16, steps=8, sampler="cached", seed=6),
    GenerateRequest(infill="The quick [MASK][MASK][MASK] fox", steps=6, sampler="ancestral", seed=7),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("continuous") / "mdlm")


def _engine(model_path, **settings) -> Engine:
    """A pass waits up to 2 s for every running request (they arrive in milliseconds): the sharing asserted below
    does not depend on this machine's load."""
    settings = {"model": str(model_path), "step_wait_s": 2.0, **settings}
    return Engine(load_pretrained(model_path), serve_config_from_dict(settings))


def _together(engine: Engine, requests: list[GenerateRequest]) -> list[dict]:
    """Every request in its own thread, released at once (as the service's thread pool runs them)."""
    jobs = [engine.plan_generate(r.model_copy(update={"return_tokens": True})) for r in requests]
    results: list[dict] = [{} for _ in jobs]
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait()
        results[i] = engine.run_continuous(jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_mixed_requests_share_passes_and_keep_their_seeded_tokens(model_path):
    engine = _engine(model_path)
    alone = [engine.run_generate([engine.plan_generate(r.model_copy(update={"return_tokens": True}))])[0]
             for r in MIXED]  # batching=request path: each job alone, the model's own sampler call
    together = _together(engine, MIXED)
    for single, shared, request in zip(alone, together, MIXED, strict=True):
        assert shared["samples"] == single["samples"], request  # the same tokens whatever ran beside it
        assert shared["num_forward_passes"] == single["num_forward_passes"]  # each request's own pass count
        assert shared["batch"]["mode"] == "continuous"
    totals = engine.batcher.totals
    own = sum(r["num_forward_passes"] for r in alone)
    assert totals.passes < own / 2, (totals.passes, own)  # passes were shared
    assert totals.mixed_length_passes > 0 and max(totals.requests_per_pass) >= 4
    assert max(r["batch"]["mean_requests_per_pass"] for r in together) > 2
    one_by_one = _engine(model_path)
    for request in MIXED:  # the same requests through a batcher, one at a time: no sharing, same rows asked for
        one_by_one.run_continuous(one_by_one.plan_generate(request))
    assert one_by_one.batcher.totals.passes == own and one_by_one.batcher.totals.rows == totals.rows


def test_a_request_joins_a_running_batch_and_leaves_when_done(model_path):
    engine = _engine(model_path)
    long_job = engine.plan_generate(GenerateRequest(length=32, steps=400, sampler="ancestral", seed=0))
    short_job = engine.plan_generate(GenerateRequest(length=16, steps=5, sampler="ancestral", seed=1))
    out: dict[str, dict] = {}
    runner = threading.Thread(target=lambda: out.update(long=engine.run_continuous(long_job)))
    runner.start()
    deadline = time.monotonic() + 60
    while engine.batcher.totals.passes < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    short = engine.run_continuous(short_job)
    assert runner.is_alive()  # the short request finished inside the long one's run
    passes_at_short_end = engine.batcher.totals.passes
    runner.join(timeout=120)
    assert short["num_forward_passes"] == 5 and short["batch"]["requests"] == 2
    assert short["batch"]["mean_requests_per_pass"] == 2.0  # each of its 5 passes shared with the long request
    assert 20 <= passes_at_short_end < 400
    # ancestral stops once nothing is masked (usually a little before step 400)
    assert out["long"]["num_forward_passes"] > passes_at_short_end and engine.batcher.totals.requests_per_pass[2] == 5


def test_rows_per_pass_are_capped(model_path):
    engine = _engine(model_path, max_batch_rows=4, max_num_samples=4)
    requests = [GenerateRequest(length=16, steps=6, sampler="ancestral", seed=s, num_samples=2) for s in range(3)]
    results = _together(engine, requests)
    assert all(len(r["samples"]) == 2 for r in results)
    assert max(engine.batcher.totals.requests_per_pass) <= 2  # 3 requests x 2 rows never in one pass of 4
    with pytest.raises(ConfigError, match="max_batch_rows 4 is below max_num_samples 8"):
        serve_config_from_dict({"max_batch_rows": 4, "max_num_samples": 8})
    assert serve_config_from_dict({"batching": "request", "max_batch_rows": 4, "max_num_samples": 8})
    with pytest.raises(ConfigError, match="batching"):
        serve_config_from_dict({"batching": "dynamic"})


def test_a_failing_pass_fails_its_requests_only():
    calls = []

    def backbone(z, t, keep):
        calls.append(z.shape)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return torch.zeros(*z.shape, 5)

    batcher = StepBatcher(backbone, pad_id=4, wait_s=0.0)
    try:
        with batcher.session() as (forward, _), pytest.raises(RuntimeError, match="simulated"):
            forward(torch.full((1, 3), 4), torch.ones(1))
        with batcher.session() as (forward, stats):
            assert forward(torch.full((2, 3), 4), torch.ones(2)).shape == (2, 3, 5)
        assert stats.passes == 1 and batcher.totals.passes == 1
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"), batcher.session():
        pass


def test_streams_share_passes_with_other_requests(model_path):
    engine = _engine(model_path)
    frames: list[dict] = []
    job = engine.plan_generate(GenerateRequest(length=32, steps=64, sampler="ancestral", seed=3))
    other = engine.plan_generate(GenerateRequest(length=24, steps=2000, sampler="ancestral", seed=4))
    side = threading.Thread(target=engine.run_continuous, args=(other,))
    side.start()
    done = engine.stream(job, frames.append)
    side.join(timeout=60)
    alone = _engine(model_path, batching="request")
    assert alone.batcher is None
    expected = alone.stream(job, [].append)
    assert done["samples"] == expected["samples"] and done["batch"]["mode"] == "continuous"
    assert done["batch"]["requests"] == 2 and frames[-1]["masked"] == 0
