"""Structured output: vLLM's grammar bitmask applied by our runner before sampling.

A random-weight model has no idea of JSON, so every constraint below is the grammar's work alone: if the
runner dropped or misaligned the bitmask, the replies would not parse. Over HTTP on the MLX-managed path (one
real server for the module, started like `vmetal serve` starts it), and offline on the paged path, whose greedy
constrained output must equal the MLX path's token for token.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from vmetal.server.process import STRUCTURED_OUTPUTS_CONFIG

pytestmark = pytest.mark.slow

from tests.support.servers import SERVED as MODEL

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]

# Nested objects, enums, arrays and required fields; every value bounded, so a random model ends in time.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "active", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3}-[0-9]{2,4}"
CHOICES = ["red apple", "green pear", "blue plum"]
# vLLM's grammar requests take EBNF (GBNF) under xgrammar.
GRAMMAR = 'root ::= "SELECT " col " FROM " tbl\ncol ::= "id" | "name" | "age"\ntbl ::= "users" | "orders"'
GRAMMAR_RE = r"SELECT (id|name|age) FROM (users|orders)"


@pytest.fixture(scope="module")
def server(default_server):
    """The session's shared server (tests/support/servers.py), started as `vmetal serve` starts one."""
    return default_server


@pytest.fixture(scope="module")
def client(default_client):
    return default_client


def chat(client, **kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL, messages=CHAT, **kw).choices[0]


def test_json_schema_twenty_samples_at_temperature_one_all_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda seed: chat(client, temperature=1.0, seed=seed, response_format=fmt),
                                range(20)))
    texts = set()
    for reply in replies:
        assert reply.finish_reason == "stop", reply.message.content
        doc = json.loads(reply.message.content)
        jsonschema.validate(doc, PERSON)
        texts.add(reply.message.content)
    # Sampling really happened under the mask (20 seeds do not all agree).
    assert len(texts) > 1


def test_json_object_parses_as_an_object(client, qwen3_model):
    from transformers import AutoTokenizer

    # `json_object` bounds nothing (keys and strings may run on forever), and a random model does not know
    # to stop; a bias towards `"` and `}` lets it close strings and objects while still sampling at
    # temperature 1. Whatever the bias, only the mask makes the text JSON.
    tok = AutoTokenizer.from_pretrained(str(qwen3_model))
    bias = {str(tok.convert_tokens_to_ids(t)): 4 for t in ('"', "}")}
    for seed in range(5):
        reply = chat(client, temperature=1.0, seed=seed, max_tokens=400, logit_bias=bias,
                     response_format={"type": "json_object"})
        assert reply.finish_reason == "stop", reply.message.content
        assert isinstance(json.loads(reply.message.content), dict)


def test_streamed_json_schema_equals_the_whole_reply(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = chat(client, temperature=0, response_format=fmt).message.content
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, temperature=0,
                                            response_format=fmt, stream=True) if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), PERSON)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_choice_and_grammar_constraints_hold(client, temperature):
    for seed in range(4):
        extra = {"temperature": temperature, "seed": seed, "max_tokens": 40}
        text = client.completions.create(model=MODEL, prompt="Code:", extra_body={"structured_outputs":
                                         {"regex": REGEX}}, **extra).choices[0].text
        assert re.fullmatch(REGEX, text), text
        text = client.completions.create(model=MODEL, prompt="Fruit:", extra_body={"structured_outputs":
                                         {"choice": CHOICES}}, **extra).choices[0].text
        assert text in CHOICES
        text = client.completions.create(model=MODEL, prompt="Query:", extra_body={"structured_outputs":
                                         {"grammar": GRAMMAR}}, **extra).choices[0].text
        assert re.fullmatch(GRAMMAR_RE, text), text


def test_constrained_and_free_requests_share_a_batch(client):
    """Masked rows and plain rows in one step: the mask must land on its own row only."""
    free_before = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16,
                                            temperature=0).choices[0].text

    def constrained(i):
        return client.completions.create(model=MODEL, prompt=f"Code {i}:", max_tokens=40, temperature=0,
                                         extra_body={"structured_outputs": {"regex": REGEX}}).choices[0].text

    def free(_):
        return client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = [pool.submit(constrained if i % 2 else free, i) for i in range(8)]
        results = [(i, f.result()) for i, f in enumerate(got)]
    for i, text in results:
        if i % 2:
            assert re.fullmatch(REGEX, text), text
        else:
            assert text == free_before


def test_invalid_schema_is_a_400_and_the_server_keeps_serving(server, client):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/chat/completions", json={
            "model": MODEL, "messages": CHAT, "max_tokens": 8,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]
    text = client.completions.create(model=MODEL, prompt="Fruit:", max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"choice": CHOICES}}).choices[0].text
    assert text in CHOICES


def test_serve_passes_compact_json_config_that_vllm_accepts():
    from vllm.config import StructuredOutputsConfig

    cfg = StructuredOutputsConfig(**json.loads(STRUCTURED_OUTPUTS_CONFIG))
    assert cfg.disable_any_whitespace and cfg.backend == "xgrammar"


# ---------------------------------------------------------------- paged path, offline engine
def _paged_and_mlx_greedy(model, monkeypatch):
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    prompts = ["Person:", "Another person, please:"]
    params = SamplingParams(temperature=0, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    out = {}
    for paged, fraction in (("1", "0.2"), ("0", "auto")):
        monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", paged)
        monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", fraction)
        llm = LLM(model=str(model), max_model_len=256, max_num_seqs=4, seed=0,
                  structured_outputs_config=json.loads(STRUCTURED_OUTPUTS_CONFIG))
        try:
            out[paged] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
            texts = [o.outputs[0].text for o in llm.generate(["Code:"] * 3, SamplingParams(
                temperature=1.0, seed=7, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=REGEX)))]
            assert all(re.fullmatch(REGEX, t) for t in texts), texts
            docs = [o.outputs[0].text for o in llm.generate(prompts, params)]
            for doc in docs:
                jsonschema.validate(json.loads(doc), PERSON)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return out


def test_paged_path_constrained_greedy_equals_mlx_path(qwen3_model, monkeypatch):
    out = _paged_and_mlx_greedy(qwen3_model, monkeypatch)
    assert out["1"] == out["0"]
