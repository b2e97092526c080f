"""The OpenAI-compatible endpoints through the official ``openai`` client, over real HTTP on a local Ray Serve;
the OpenAPI schema of every endpoint; and no 500 for invalid Unicode, malformed JSON or a non-UTF-8 body on any
endpoint that takes text (a 4xx naming the field)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from tokenizers import Tokenizer

from mdlm.serve.openai_api import truncate_at_stop
from tests.serve_support import LIMITS, make_model_dirs, running_service

pytestmark = pytest.mark.ray

EXTRA = {"steps": 8, "sampler": "ancestral"}  # the service's extension fields, as the client sends them


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return make_model_dirs(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def service(model_dirs):
    with running_service({"mdlm": ("/", {"model": str(model_dirs["mdlm"]), **LIMITS}),
                          "ar": ("/ar", {"model": str(model_dirs["ar"]), "served_model_name": "tiny-ar",
                                         **LIMITS})}) as url:
        yield url


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service}/v1", api_key="any string", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return Tokenizer.from_file(str(model_dirs["mdlm"] / "tokenizer.json"))


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _texts(completion) -> list[str]:
    return [choice.text for choice in completion.choices]


def test_models_list_names_the_served_model(client, service):
    assert [model.id for model in client.models.list()] == ["mdlm"]
    ar = openai.OpenAI(base_url=f"{service}/ar/v1", api_key="x", max_retries=0, timeout=30)
    cards = ar.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in cards] == [("tiny-ar", "model", "mdlm")]
    assert requests.get(f"{service}/v1/model", timeout=10).json()["id"] == "mdlm"


def test_completion_with_two_choices_counts_usage_and_is_reproducible_with_a_seed(client, service, tokenizer):
    prompt = "To be, or not"
    out = client.completions.create(model="mdlm", prompt=prompt, max_tokens=12, n=2, seed=7, extra_body=EXTRA)
    assert out.object == "text_completion" and out.model == "mdlm" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.logprobs is None for c in out.choices)
    texts = _texts(out)
    assert texts[0] != texts[1]  # two samples of one sampler call, not one sample twice
    assert out.usage.prompt_tokens == _count(tokenizer, prompt)
    assert out.usage.completion_tokens == sum(_count(tokenizer, t) for t in texts)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model="mdlm", prompt=prompt, max_tokens=12, n=2, seed=7, extra_body=EXTRA)
    assert _texts(again) == texts
    other = client.completions.create(model="mdlm", prompt=prompt, max_tokens=12, n=2, seed=8, extra_body=EXTRA)
    assert _texts(other) != texts
    # The same engine as /v1/generate: its samples with the same seed, after the prompt's tokens, are the choices.
    bos = tokenizer.token_to_id("<|endoftext|>")
    prefix = [bos, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    generated = requests.post(f"{service}/v1/generate", timeout=60, json={
        "prompt": prompt, "num_samples": 2, "length": len(prefix) + 12, "seed": 7, "return_tokens": True, **EXTRA,
    }).json()["samples"]
    assert all(s["tokens"][:len(prefix)] == prefix and len(s["tokens"]) == len(prefix) + 12 for s in generated)
    assert [tokenizer.decode(s["tokens"][len(prefix):], skip_special_tokens=True) for s in generated] == texts


def test_a_list_of_prompts_gives_n_choices_each_in_order(client, tokenizer):
    prompts = ["To be", "Now is the winter"]
    out = client.completions.create(model="mdlm", prompt=prompts, max_tokens=6, n=2, seed=3, extra_body=EXTRA)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == sum(_count(tokenizer, p) for p in prompts)
    second = client.completions.create(model="mdlm", prompt=prompts[1], max_tokens=6, n=2, seed=3, extra_body=EXTRA)
    assert _texts(out)[2:] == _texts(second)  # choices 2 and 3 belong to the second prompt


def test_stop_strings_cut_the_text_at_the_first_one(client, tokenizer):
    kwargs = {"model": "mdlm", "prompt": "To be", "max_tokens": 24, "seed": 5, "extra_body": EXTRA}
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 6, full
    stop = full[4:6]
    expected = full[:full.find(stop)]
    out = client.completions.create(stop=["\x00never", stop], **kwargs)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == _count(tokenizer, expected)
    unmatched = client.completions.create(stop="\x00never", **kwargs).choices[0]
    assert unmatched.text == full and unmatched.finish_reason == "length"


def test_truncate_at_stop_takes_the_earliest_match_of_any_stop_string():
    assert truncate_at_stop("abcabc", ["ca", "b"]) == ("a", "stop")  # "b" (at 1) comes before "ca" (at 2)
    assert truncate_at_stop("abcabc", ["x"]) == ("abcabc", "length")
    assert truncate_at_stop("abc", ["a"]) == ("", "stop")


def test_stream_reassembles_to_the_text_and_ends(client, service):
    kwargs = {"model": "mdlm", "prompt": ["To be", "Now is"], "max_tokens": 8, "n": 2, "seed": 11,
              "extra_body": EXTRA}
    chunks = list(client.completions.create(stream=True, **kwargs))  # list() returns: the stream terminated
    assert chunks and all(chunk.object == "text_completion" and chunk.usage is None for chunk in chunks)
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            finished[choice.index] = choice.finish_reason
    plain = client.completions.create(**kwargs)
    assert streamed == {c.index: c.text for c in plain.choices}
    assert finished == {c.index: c.finish_reason for c in plain.choices}
    # The wire format: `data: {json}` events separated by blank lines, the last one `data: [DONE]`.
    body = {"model": "mdlm", "prompt": "To be", "max_tokens": 4, "n": 2, "stream": True, **EXTRA}
    with requests.post(f"{service}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.content.decode("utf-8").split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-2])
    assert sorted(c["index"] for p in payloads for c in p["choices"]) == [0, 1]


def test_an_autoregressive_model_completes_too(service):
    ar = openai.OpenAI(base_url=f"{service}/ar/v1", api_key="x", max_retries=0, timeout=60)
    out = ar.completions.create(model="tiny-ar", prompt="To be", max_tokens=5, seed=0)
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length" and out.model == "tiny-ar"
    with pytest.raises(openai.NotFoundError):
        ar.completions.create(model="mdlm", prompt="To be")


def test_a_wrong_model_is_a_404_in_openai_error_shape(client, service):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="To be")
    error = info.value
    assert error.status_code == 404 and error.param == "model" and error.code == "model_not_found"
    assert error.type == "invalid_request_error" and "gpt-4" in error.message and "mdlm" in error.message
    raw = requests.post(f"{service}/v1/completions", json={"model": "gpt-4"}, timeout=10)
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


BAD_COMPLETIONS = [
    # (keyword arguments to completions.create, the field OpenAI's error names)
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),  # over the service's max_length (4 x the 32-token block)
    ({"n": 9}, "n"),  # over max_num_samples = 8
    ({"prompt": ["a", "b", "c", "d", "e"], "n": 2}, "prompt"),  # 10 completions in all
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"temperature": 0.5}, "temperature"),  # not supported: rejected by name
    ({"prompt": "x" * 201}, "prompt"),  # over max_prompt_chars
    ({"prompt": ["fine", "x" * 201]}, "prompt[1]"),
    ({"prompt": "To be, or not to be, that is the question. " * 4}, "prompt"),  # as long as the block
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"extra_body": {"sampler": "beam"}}, "sampler"),
    ({"extra_body": {"steps": 501}}, "steps"),
    ({"extra_body": {"steps": "ten"}}, "steps"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_COMPLETIONS, ids=[f for _, f in BAD_COMPLETIONS])
def test_bad_completion_values_raise_bad_request_naming_the_field(client, kwargs, field):
    kwargs = {"model": "mdlm", "prompt": "To be", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    assert info.value.param == field and info.value.body["message"].startswith(f"{field}: ")


def test_an_oversized_completion_body_is_a_413_in_openai_error_shape(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="mdlm", prompt="x" * 5000)
    assert info.value.status_code == 413 and info.value.param == "body"


# Every endpoint that takes text, with a string that holds an unpaired surrogate: (path, raw body, status, field).
SURROGATES = [
    ("/v1/generate", rb'{"prompt": "\ud800"}', 422, "prompt"),
    ("/v1/generate", rb'{"infill": "To be, \udfff[MASK]"}', 422, "infill"),
    ("/v1/generate", b'{"prompt": "\xed\xa0\x80"}', 422, "prompt"),  # the surrogate's raw bytes, not an escape
    ("/v1/generate", rb'{"\ud800": 1}', 422, "body"),  # in a key
    ("/v1/generate/stream", rb'{"prompt": "x\ud800"}', 422, "prompt"),
    ("/v1/score", rb'{"texts": ["fine", "\ud800"]}', 422, "texts[1]"),
    ("/ar/v1/generate", rb'{"prompt": "\ud800"}', 422, "prompt"),
    ("/ar/v1/score", rb'{"texts": ["\udbff"]}', 422, "texts[0]"),
    ("/v1/completions", rb'{"model": "mdlm", "prompt": "\ud800"}', 400, "prompt"),
    ("/v1/completions", rb'{"model": "mdlm", "prompt": ["fine", "\ud800"]}', 400, "prompt[1]"),
    ("/v1/completions", rb'{"model": "mdlm", "stop": "\ud800"}', 400, "stop"),
    ("/v1/completions", rb'{"model": "mdlm", "stop": ["a", "\ud800"]}', 400, "stop[1]"),
    ("/v1/completions", rb'{"model": "\ud800"}', 400, "model"),
    ("/ar/v1/completions", rb'{"model": "tiny-ar", "prompt": "\ud800"}', 400, "prompt"),
]
TEXT_ENDPOINTS = ["/v1/generate", "/v1/generate/stream", "/v1/score", "/v1/completions",
                  "/ar/v1/generate", "/ar/v1/score", "/ar/v1/completions"]


def _raw(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)


def _named_field(response: requests.Response) -> str:
    error = response.json()["error"]
    if response.url.endswith("/v1/completions"):
        assert set(error) == {"message", "type", "param", "code"}
        return error["param"]
    return error["field"]


@pytest.mark.parametrize(("path", "body", "status", "field"), SURROGATES,
                         ids=[f"{p}:{f}" for p, _, _, f in SURROGATES])
def test_an_unpaired_surrogate_is_a_4xx_naming_the_field(service, path, body, status, field):
    response = _raw(f"{service}{path}", body)
    assert response.status_code == status, response.text
    assert _named_field(response) == field
    assert "not valid Unicode" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", TEXT_ENDPOINTS)
def test_malformed_json_and_a_non_utf8_body_are_a_400_on_every_text_endpoint(service, path):
    malformed = _raw(f"{service}{path}", b'{"prompt": "To be')
    assert malformed.status_code == 400 and _named_field(malformed) == "body"
    assert "malformed JSON" in malformed.text
    latin1 = _raw(f"{service}{path}", b'{"prompt": "caf\xe9"}')
    assert latin1.status_code == 400 and _named_field(latin1) == "body"
    assert "not valid UTF-8 (byte 0xe9 at offset 15)" in latin1.json()["error"]["message"]
    # The replica survived: a good request still works.
    assert requests.get(f"{service}{path.split('/v1/')[0]}/v1/health", timeout=10).status_code == 200


def test_openapi_describes_every_endpoints_response(service):
    schema = requests.get(f"{service}/openapi.json", timeout=10).json()
    refs = {(path, method, media): body["schema"]
            for path, methods in schema["paths"].items() for method, op in methods.items()
            for media, body in op["responses"]["200"]["content"].items()}
    component = "#/components/schemas/{}".format
    assert refs == {
        ("/v1/health", "get", "application/json"): {"$ref": component("Health")},
        ("/v1/model", "get", "application/json"): {"$ref": component("ModelInfo")},
        ("/v1/generate", "post", "application/json"): {"$ref": component("GenerateResponse")},
        ("/v1/generate/stream", "post", "application/x-ndjson"): refs[("/v1/generate/stream", "post",
                                                                       "application/x-ndjson")],
        ("/v1/score", "post", "application/json"): {"$ref": component("ScoreResponse")},
        ("/v1/models", "get", "application/json"): {"$ref": component("ModelList")},
        ("/v1/completions", "post", "application/json"): {"$ref": component("Completion")},
        ("/v1/completions", "post", "text/event-stream"): {"$ref": component("Completion")},
    }
    frames = refs[("/v1/generate/stream", "post", "application/x-ndjson")]["oneOf"]
    assert frames == [{"$ref": component(name)} for name in ("StateFrame", "DoneFrame", "ErrorFrame")]
    components = schema["components"]["schemas"]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(components["Completion"]["properties"])
    assert components["CompletionChoice"]["properties"]["finish_reason"]["enum"] == ["stop", "length"]
    assert set(components["CompletionUsage"]["required"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["404"]["content"]["application/json"]["schema"] == {"$ref": component("OpenAIErrorResponse")}
    assert "422" not in completions
    generate = schema["paths"]["/v1/generate"]["post"]["responses"]
    assert generate["422"]["content"]["application/json"]["schema"] == {"$ref": component("ErrorResponse")}
