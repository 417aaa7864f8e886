"""The server's endpoints fuzzed from their own OpenAPI schema (schemathesis): no 5xx, no crash.

A real `vmetal` server (vLLM's OpenAI server with the plugin, tiny model) publishes `/openapi.json`; schemathesis
generates requests for every operation from it, both schema-conforming and schema-violating ones. Each answer must
be below 500, and afterwards the server must still answer a normal request with the same greedy text as before.
"""

from __future__ import annotations

import collections
import json

import httpx
import pytest
import requests

from vmetal.server.process import ServerProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"
EXAMPLES = 30  # per operation and generation mode
# Fields whose size sets how long a request computes: kept small so the fuzz explores request shapes, not the
# CPU's patience (a generated `n` of 10^9 is a valid request that merely takes forever). Everything else is left
# as generated.
BOUNDED = {"n": 2, "best_of": 2, "max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8,
           "min_tokens": 4, "logprobs": 3, "top_logprobs": 3, "prompt_logprobs": 3}
# Not fuzzed: it asks the server to re-shard itself across data-parallel engines.
SKIPPED = ("/scale_elastic_ep",)
# vLLM answers 501 Not Implemented, by design, on the structured-decision endpoint for models without that head
# (every model vmetal serves); it is the documented answer, not a failure of the server.
NOT_IMPLEMENTED = {"/v1/systemone"}
# vLLM 0.32's Responses API fails on some valid-looking inputs in its own request handling, before any engine or
# plugin code runs: an assistant message with empty `content` -> 500 "list index out of range"; an explicit
# `"background": null` with `stream: true` -> the stream is cut after its HTTP 200 (ResponsesResponse wants a
# bool). Upstream bugs outside vmetal's code: counted and printed, not failed; every other endpoint must not 5xx.
UPSTREAM_BUGS = {"/v1/responses"}


def clamp(value):
    if isinstance(value, dict):
        for key, item in list(value.items()):
            if (key in BOUNDED and isinstance(item, (int, float)) and not isinstance(item, bool)
                    and item > BOUNDED[key]):
                value[key] = BOUNDED[key]
            else:
                clamp(item)
    elif isinstance(value, list):
        for item in value:
            clamp(item)


@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    proc = ServerProcess(str(qwen3_model), host="127.0.0.1", port=free_port(), served_model_name=MODEL,
                         vllm_args=["--max-model-len", "128", "--max-num-seqs", "8"], echo=False, log_path=log)
    with proc:
        yield proc


def greedy_text(server) -> str:
    r = httpx.post(server.url + "/completions", timeout=60,
                   json={"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_every_operation_fuzzed_from_the_openapi_schema_gets_no_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    before = greedy_text(server)
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", timeout=30)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/messages", "/tokenize"} <= {op.path for op in operations}
    statuses: collections.Counter[int] = collections.Counter()
    failures, upstream = [], []
    for op in operations:
        if op.path in SKIPPED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case):
                clamp(case.body)
                sent = json.dumps(case.body, default=str)[:200]
                try:
                    r = case.call(base_url=server.base_url, timeout=60)
                except requests.RequestException as e:  # a stream cut short is a crash the client sees
                    outcome, detail = type(e).__name__, ""
                else:
                    statuses[r.status_code] += 1
                    if r.status_code < 500 or (r.status_code == 501 and op.path in NOT_IMPLEMENTED):
                        return
                    outcome, detail = str(r.status_code), r.text[:200]
                line = f"{op.method.upper()} {op.path} -> {outcome} {detail} body={sent}"
                (upstream if op.path in UPSTREAM_BUGS else failures).append(line)

            try:
                call()
            except Unsatisfiable:
                # An operation without inputs (GET /health) has no schema-violating request to make.
                assert mode == GenerationMode.NEGATIVE, op.path
    # The figures RESULTS.md records (pytest -s shows them).
    print(f"fuzzed {len(operations) - len(SKIPPED)} operations: {sum(statuses.values())} answered, "
          f"statuses {dict(sorted(statuses.items()))}; {len(upstream)} upstream Responses-API failures")
    for line in upstream[:5]:
        print("  upstream:", line)
    assert not failures, "\n".join(failures[:10])
    assert sum(statuses.values()) >= 20 * len(operations), statuses  # the fuzz really ran
    assert server.returncode is None
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert greedy_text(server) == before


def test_the_upstream_responses_bugs_the_fuzz_tolerates_still_exist(server):
    """When a vLLM upgrade fixes them, this fails: then drop UPSTREAM_BUGS and hold /v1/responses to no 5xx."""
    empty_assistant = {"model": MODEL, "max_output_tokens": 4,
                       "input": [{"type": "message", "role": "assistant", "content": [], "status": "completed",
                                  "id": ""}]}
    r = httpx.post(server.base_url + "/v1/responses", json=empty_assistant, timeout=60)
    assert r.status_code == 500 and "list index out of range" in r.text, r.text
    null_background = {"model": MODEL, "input": "hi", "max_output_tokens": 4, "stream": True, "background": None}
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", server.base_url + "/v1/responses", json=null_background, timeout=60) as r:
            assert r.status_code == 200
            r.read()
    assert greedy_text(server)  # the server is still serving
