"""The service's model side without Ray or HTTP: settings, request planning, batching of jobs, streaming."""

from __future__ import annotations

import pytest
import torch

from mdlm.config import ConfigError
from mdlm.modeling import load_pretrained
from mdlm.serve.engine import Cancelled, Engine
from mdlm.serve.schemas import GenerateRequest, RequestError, ScoreRequest
from mdlm.serve.settings import serve_config_from_dict
from tests.serve_support import make_model_dir


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("engine") / "mdlm")
    return Engine(load_pretrained(path), serve_config_from_dict({"model": str(path), "max_num_samples": 4}))


def test_settings_reject_unknown_keys_and_parse_serve_run_strings():
    with pytest.raises(ConfigError, match="max_batch_sise"):
        serve_config_from_dict({"model": "m", "max_batch_sise": 4})
    with pytest.raises(ConfigError, match="model: String should have at least 1 character"):
        serve_config_from_dict({"model": ""})
    assert serve_config_from_dict({}).model == "models:/mdlm@current"  # what the main job registers
    with pytest.raises(ConfigError, match="max_length: Input should be greater than 0, got '-1'"):
        serve_config_from_dict({"max_length": "-1"})
    assert serve_config_from_dict({"max_length": "null"}).max_length is None  # `max_length=null` on a command line
    with pytest.raises(ConfigError, match="min_replicas 5 exceeds max_replicas 4"):
        serve_config_from_dict({"min_replicas": 5})
    with pytest.raises(ConfigError, match="max_steps"):
        serve_config_from_dict({"model": "m", "max_steps": "many"})
    settings = serve_config_from_dict({"model": "m", "max_batch_size": "32", "batch_wait_timeout_s": "0.1",
                                       "autoscaling": "true"})
    assert settings.max_batch_size == 32 and settings.batch_wait_timeout_s == 0.1
    options = settings.deployment_options()
    assert options["max_ongoing_requests"] >= settings.max_batch_size
    assert options["autoscaling_config"]["max_replicas"] == settings.max_replicas and "num_replicas" not in options
    assert settings.host == "127.0.0.1"


def test_serve_typed_builder_validates_args_with_the_settings_model():
    """``serve run mdlm.serve.app:build_app k=v`` and a Serve config's ``args`` go through Serve's own typed-builder
    path: the builder's annotation is the pydantic model, which coerces the strings and rejects bad keys."""
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from mdlm.serve.app import build_app
    from mdlm.serve.settings import ServeConfig

    with pytest.raises(ValidationError, match="max_batch_sise"):
        call_user_app_builder_with_args_if_necessary(build_app, {"model": "models:/m@a", "max_batch_sise": "4"})
    app = call_user_app_builder_with_args_if_necessary(build_app, {"model": "models:/m@a", "max_batch_size": "32",
                                                                   "num_replicas": "2"})
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.max_ongoing_requests == 2 * 32 + 8
    assert ServeConfig.model_validate(deployment.init_args[0]).max_batch_size == 32


def test_compatible_jobs_share_one_sampler_call_and_keep_their_own_prompts(engine):
    mask = engine.mask_token
    requests = [GenerateRequest(prompt="To be", length=16, steps=8, num_samples=2),
                GenerateRequest(infill=f"The quick {mask}{mask} fox {mask} over the lazy dog.", steps=8),
                GenerateRequest(prompt="Now is", length=16, steps=8),
                GenerateRequest(prompt="Now is", length=16, steps=8, seed=1),  # own random stream: alone
                GenerateRequest(length=16, steps=4)]  # other steps: another group
    jobs = [engine.plan_generate(r) for r in requests]
    results = engine.run_generate(jobs)
    assert [len(r["samples"]) for r in results] == [2, 1, 1, 1, 1]
    assert results[0]["samples"][0]["text"].startswith("To be")
    assert results[2]["samples"][0]["text"].startswith("Now is")
    assert results[0]["batch"] == results[2]["batch"] and results[0]["batch"]["requests"] >= 2
    assert results[3]["batch"]["requests"] == 1 and results[4]["batch"]["requests"] == 1
    infill = results[1]["samples"][0]["text"]
    assert infill.startswith("The quick") and infill.endswith(" over the lazy dog.")


def test_a_seed_makes_a_request_reproducible_whatever_runs_beside_it(engine):
    body = GenerateRequest(prompt="To be", length=16, steps=8, seed=11, return_tokens=True)
    alone = engine.run_generate([engine.plan_generate(body)])[0]["samples"]
    crowd = engine.run_generate([engine.plan_generate(GenerateRequest(length=16, steps=8)),
                                 engine.plan_generate(body)])[1]["samples"]
    assert alone == crowd


def test_stream_emits_decreasing_masks_and_stops_when_cancelled(engine):
    frames = []
    job = engine.plan_generate(GenerateRequest(length=32, steps=32, sampler="ancestral", seed=0))
    final = engine.stream(job, frames.append)
    masked = [f["masked"] for f in frames]
    assert masked[0] == 31 and masked[-1] == 0 and masked == sorted(masked, reverse=True)
    assert len(frames) <= engine.settings.max_stream_frames + 2 and final["type"] == "done"
    calls = []
    with pytest.raises(Cancelled):
        engine.stream(job, calls.append, cancelled=lambda: len(calls) >= 2)
    assert len(calls) == 2


def test_limits_and_model_checks_name_the_field(engine):
    cases = [(GenerateRequest(num_samples=5), "num_samples"), (GenerateRequest(length=200), "length"),
             (GenerateRequest(steps=20000), "steps"), (GenerateRequest(infill="no gaps"), "infill"),
             (GenerateRequest(length=16, stride=4), "stride"), (GenerateRequest(length=64, stride=40), "stride"),
             (GenerateRequest(infill=f"a {engine.mask_token}", length=4), "length")]
    for request, field in cases:
        with pytest.raises(RequestError) as info:
            engine.plan_generate(request)
        assert info.value.field == field
    with pytest.raises(RequestError) as info:
        engine.plan_score(ScoreRequest(texts=["fine", f"has {engine.mask_token}"]))
    assert info.value.field == "texts[1]"


def test_score_blocks_cover_long_texts(engine):
    text = "To be, or not to be, that is the question. " * 6
    rows, masks = engine.plan_score(ScoreRequest(texts=[text]))
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    assert int(masks[0].sum()) == len(ids) + 2 and rows[0].shape[1] == engine.block and rows[0].shape[0] > 1
    out = engine.score(ScoreRequest(texts=[text, "Now is the winter"], mc_samples=4))
    assert out["results"][0]["num_tokens"] == len(ids) + 2
    assert all(r["nelbo"] > 0 and r["std_error"] > 0 for r in out["results"])
    again = engine.score(ScoreRequest(texts=[text, "Now is the winter"], mc_samples=4))
    assert again == out  # seeded: the same texts get the same scores
    crowd = engine.score_many([ScoreRequest(texts=["All the world's a stage"], mc_samples=4, seed=9),
                               ScoreRequest(texts=[text, "Now is the winter"], mc_samples=4)])
    assert crowd[1]["batch_requests"] == 2  # batching changes the draws of no text (only float rounding)
    for mine, alone in zip(crowd[1]["results"], out["results"], strict=True):
        assert mine == {k: pytest.approx(v, rel=1e-6) for k, v in alone.items()}
    assert torch.isfinite(torch.tensor([r["perplexity_bound"] for r in out["results"]])).all()


@pytest.mark.parametrize("kind", ["sedd", "d3pm"])
def test_baselines_generate_with_each_of_their_samplers_and_score_a_bound(tmp_path, kind):
    path = make_model_dir(tmp_path / kind, kind=kind)
    engine = Engine(load_pretrained(path), serve_config_from_dict({"model": str(path)}))
    assert engine.info()["samplers"] == list(engine.model.samplers) and engine.info()["model_type"] == kind
    for sampler in engine.model.samplers:
        job = engine.plan_generate(GenerateRequest(prompt="To be", length=16, steps=8, sampler=sampler, seed=0))
        result = engine.run_generate([job])[0]
        assert result["sampler"] == sampler and result["samples"][0]["text"].startswith("To be")
    scored = engine.score(ScoreRequest(texts=["To be, or not to be"], mc_samples=2))
    assert scored["bound"].startswith("NELBO") and scored["results"][0]["nelbo"] > 0


def test_a_sampler_of_another_kind_is_a_request_error(engine, tmp_path):
    with pytest.raises(RequestError) as info:
        engine.plan_generate(GenerateRequest(length=16, steps=8, sampler="euler"))
    assert info.value.field == "sampler" and "euler" in info.value.message
    path = make_model_dir(tmp_path / "d3pm", kind="d3pm")
    with pytest.raises(ValueError, match="default_sampler"):
        Engine(load_pretrained(path), serve_config_from_dict({"model": str(path), "default_sampler": "first_hitting"}))
