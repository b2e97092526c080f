"""The Serve application over real HTTP on a local Ray: generate, batching, streaming, scoring, bad input,
and the denoising page driven in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import requests
import torch

from mdlm.eval.metrics import row_seed
from mdlm.modeling import load_pretrained
from tests.serve_support import LIMITS, make_model_dirs, running_service

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return make_model_dirs(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def service(model_dirs):
    """Both models served as two applications of one local Serve instance on 127.0.0.1."""
    with running_service({"mdlm": ("/", {"model": str(model_dirs["mdlm"]), **LIMITS}),
                          "ar": ("/ar", {"model": str(model_dirs["ar"]), **LIMITS})}) as url:
        yield url


def _post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kwargs)


def test_health_and_model_info(service):
    assert requests.get(f"{service}/v1/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{service}/v1/model", timeout=10).json()
    assert info["model_type"] == "mdlm" and info["max_seq_len"] == 32 and info["mask_token"] == "[MASK]"
    assert info["limits"]["max_num_samples"] == 8
    assert requests.get(f"{service}/ar/v1/model", timeout=10).json()["model_type"] == "ar"


def test_generate_keeps_the_prompt_and_is_reproducible_with_a_seed(service):
    body = {"prompt": "To be, or not", "num_samples": 2, "length": 32, "steps": 16, "seed": 7,
            "return_tokens": True, "sampler": "ancestral"}
    first = _post(f"{service}/v1/generate", body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert len(out["samples"]) == 2
    for sample in out["samples"]:
        assert sample["text"].startswith("To be, or not")
        assert len(sample["tokens"]) == 32
    assert _post(f"{service}/v1/generate", body).json()["samples"] == out["samples"]


def test_infill_fills_only_the_gaps(service):
    out = _post(f"{service}/v1/generate", {"infill": "To be, [MASK][MASK][MASK] not to be", "seed": 1,
                                           "sampler": "first_hitting"}).json()
    text = out["samples"][0]["text"]
    assert text.startswith("To be, ") and text.endswith(" not to be")
    assert out["num_forward_passes"] == 3  # first-hitting: one pass per masked token


def test_semi_autoregressive_generation_beyond_the_block(service):
    out = _post(f"{service}/v1/generate", {"prompt": "The", "length": 80, "steps": 8, "stride": 16,
                                           "return_tokens": True}).json()
    assert len(out["samples"][0]["tokens"]) == 80


def test_concurrent_requests_are_batched(service):
    results, lock = [], threading.Lock()

    def call() -> None:
        response = _post(f"{service}/v1/generate", {"length": 32, "steps": 32, "sampler": "ancestral"})
        with lock:
            results.append(response)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    sizes = [r.json()["batch"]["requests"] for r in results]
    assert max(sizes) > 1, sizes


def test_mixed_concurrent_requests_share_forward_passes(service):
    """Continuous batching over HTTP: different lengths, steps, samplers and seeds in flight at once; the seeded
    ones return the tokens they return alone."""
    bodies = [{"length": 32, "steps": 48, "sampler": "ancestral", "seed": 1, "return_tokens": True},
              {"length": 16, "steps": 16, "sampler": "remdm", "seed": 2, "return_tokens": True},
              {"prompt": "To be", "length": 24, "sampler": "first_hitting", "seed": 3, "return_tokens": True},
              {"length": 32, "steps": 8, "sampler": "confidence_k"}, {"length": 20, "steps": 20}]
    alone = [_post(f"{service}/v1/generate", body).json() for body in bodies]
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def call(i: int) -> None:
        start.wait()
        results[i] = _post(f"{service}/v1/generate", bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    out = [r.json() for r in results]
    assert all(o["batch"]["mode"] == "continuous" for o in out)
    assert max(o["batch"]["mean_requests_per_pass"] for o in out) > 1.5, [o["batch"] for o in out]
    for i in range(3):
        assert out[i]["samples"] == alone[i]["samples"]


def test_stream_delivers_intermediate_states(service):
    with requests.post(f"{service}/v1/generate/stream", json={"prompt": "The quick", "length": 32, "steps": 32,
                                                              "sampler": "ancestral", "seed": 3},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        frames = [json.loads(line) for line in response.iter_lines() if line]
    states = [f for f in frames if f["type"] == "state"]
    assert frames[-1]["type"] == "done"
    assert len(states) >= 3
    masked = [s["masked"] for s in states]
    assert masked[0] > masked[-1] == 0
    assert masked == sorted(masked, reverse=True)
    assert any(0 < m < masked[0] for m in masked)  # a state in the middle: partly unmasked
    assert None not in states[-1]["samples"][0] and None in states[0]["samples"][0]


def test_score_matches_the_library_nelbo(service, model_dirs):
    text = "To be, or not to be, that is the question."
    out = _post(f"{service}/v1/score", {"texts": [text], "mc_samples": 1, "seed": 5}).json()
    result = out["results"][0]
    model = load_pretrained(model_dirs["mdlm"])
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    eos = model.config.eos_token_id
    row = torch.tensor([[model.config.bos_token_id, *ids, eos]])
    assert result["num_tokens"] == row.shape[1]
    generator = torch.Generator().manual_seed(row_seed(5, 0))  # block 0 of a request seeded with 5
    expected = model.loss(row, torch.ones_like(row), generator=generator).loss.item()
    assert result["nelbo"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity_bound"] == pytest.approx(math.exp(expected), rel=1e-5)
    many = _post(f"{service}/v1/score", {"texts": [text, "Now is the winter"], "mc_samples": 8}).json()
    assert all(r["std_error"] > 0 for r in many["results"])
    ar = _post(f"{service}/ar/v1/score", {"texts": [text]}).json()
    assert ar["bound"] == "exact NLL" and ar["results"][0]["nelbo"] > 0


def test_ar_model_generates_but_does_not_stream(service):
    out = _post(f"{service}/ar/v1/generate", {"prompt": "To be", "length": 20, "return_tokens": True}).json()
    assert len(out["samples"][0]["tokens"]) == 20
    response = _post(f"{service}/ar/v1/generate/stream", {"prompt": "To be"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "sampler"


BAD_REQUESTS = [
    # (path, body, status, field)
    ("/v1/generate", {"steps": "ten"}, 422, "steps"),
    ("/v1/generate", {"steps": 0}, 422, "steps"),
    ("/v1/generate", {"steps": 501}, 422, "steps"),
    ("/v1/generate", {"length": 1000}, 422, "length"),
    ("/v1/generate", {"num_samples": 9}, 422, "num_samples"),
    ("/v1/generate", {"num_samples": 1.5}, 422, "num_samples"),
    ("/v1/generate", {"sampler": "beam"}, 422, "sampler"),
    ("/v1/generate", {"top_p": 0}, 422, "top_p"),
    ("/v1/generate", {"prompt": "x" * 201}, 422, "prompt"),
    ("/v1/generate", {"prompt": "To be, or not to be, that is the question. " * 4, "length": 16}, 422, "prompt"),
    ("/v1/generate", {"infill": "no gaps here"}, 422, "infill"),
    ("/v1/generate", {"prompt": "a", "infill": "b [MASK]"}, 422, "infill"),
    ("/v1/generate", {"length": 20, "stride": 4}, 422, "stride"),
    ("/v1/generate", {"temperature": 2}, 422, "temperature"),
    ("/v1/generate", [1, 2], 422, "body"),
    ("/v1/generate/stream", {"steps": -1}, 422, "steps"),
    ("/v1/score", {"texts": []}, 422, "texts"),
    ("/v1/score", {"texts": ["a", "b", "c", "d", "e"]}, 422, "texts"),
    ("/v1/score", {"texts": [""]}, 422, "texts[0]"),
    ("/v1/score", {"texts": ["fine", 3]}, 422, "texts[1]"),
    ("/v1/score", {"texts": ["a"], "mc_samples": 17}, 422, "mc_samples"),
    ("/ar/v1/generate", {"infill": "a [MASK] b"}, 422, "infill"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD_REQUESTS,
                         ids=[f"{p}:{next(iter(b)) if isinstance(b, dict) and b else 'body'}"
                              for p, b, _, _ in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_field(service, path, body, status, field):
    response = _post(f"{service}{path}", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"]


def test_malformed_json_oversized_body_and_wrong_method(service):
    response = requests.post(f"{service}/v1/generate", data=b'{"steps": 3,', timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    response = requests.post(f"{service}/v1/generate", data=b"{" + b" " * 5000 + b"}", timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(10):
            yield b" " * 1000

    response = requests.post(f"{service}/v1/score", data=chunks(), timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert requests.get(f"{service}/v1/generate", timeout=10).status_code == 405
    # The replica survived every bad request.
    assert requests.get(f"{service}/v1/health", timeout=10).status_code == 200
    assert _post(f"{service}/v1/generate", {"length": 8, "steps": 4}).status_code == 200


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_shows_the_sequence_denoising(service, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The machine's network is closed: without the background-networking flags Chromium keeps dialling out.
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            states: list[str] = []
            page.goto(f"{service}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
            assert "MDLM model" in page.text_content("#model")
            page.fill("#prompt", "To be")
            page.fill("#steps", "500")  # ~1 s of denoising: states arrive one by one, as a person watches them
            page.fill("#length", "32")
            page.select_option("#sampler", "ancestral")
            # Record what the page shows while it denoises (each state replaces the output).
            page.expose_function("recordState", lambda text: states.append(text))
            page.evaluate("""() => new MutationObserver(() => {
                const s = document.getElementById('status').textContent;
                if (s.startsWith('Step')) window.recordState(s + '|' +
                    document.querySelectorAll('#output .m').length);
            }).observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true})""")
            page.click("#go")
            page.wait_for_selector("#final", timeout=60_000)
            final = page.text_content("#final")
            status = page.text_content("#status")
            masked_at_end = page.locator("#output .m").count()
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
    assert final.startswith("To be")
    assert status.startswith("Done:") and "forward passes" in status
    masked_counts = [int(s.rsplit("|", 1)[1]) for s in states]
    assert len(masked_counts) >= 3, states
    assert masked_counts[0] > 0 and masked_at_end == 0  # the page showed masked tokens, then none
    assert any(0 < m < masked_counts[0] for m in masked_counts), states  # and partly denoised ones between
    assert Path(tmp_path / "page.png").stat().st_size > 1000
