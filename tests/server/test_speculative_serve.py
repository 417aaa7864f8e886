"""`vmetal serve MODEL -- --speculative-config '{"method": "ngram", ...}'` and `vmetal serve MODEL --speculative
DRAFT` (issue 15): n-gram and draft-model speculation through the real CLI and vLLM's OpenAI server. Before, the
server started and every request got HTTP 500.

A server of each (the draft: the model cut to its first layer): a greedy completion that repeats its prompt comes back with mlx-lm's own text while vLLM's
`/metrics` counts drafts and accepted tokens; a sampled request beside it is answered. The engine's behaviour
in detail: tests/engine/test_speculative.py and test_draft_model.py.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.support.cli_server import CliServer
from tests.support.engine import mlx_greedy
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

SERVED = "tiny-spec"
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
REPEATING = "one two three four five six seven " * 3


@pytest.fixture(scope="module", params=["ngram", "draft"])
def server(request, qwen3_model, tmp_path_factory):
    from tests.support.families import first_layers

    port = free_port()
    folder = tmp_path_factory.mktemp("spec")
    log = folder / "serve.log"
    speculation = (["--", "--speculative-config", json.dumps(SPEC)] if request.param == "ngram"
                   else ["--speculative", str(first_layers(qwen3_model, folder / "draft", 1))])
    argv = ["serve", str(qwen3_model), "--port", str(port), "--max-model-len", "256", "--served-model-name", SERVED,
            *speculation]
    with CliServer(argv, log) as server:
        server.wait_for()
        yield f"http://127.0.0.1:{port}"


def _metrics(base: str) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(base + "/metrics", timeout=30).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_total{" in line:
            name = line.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_greedy_text_is_mlx_lms_and_metrics_count_the_drafts(server, qwen3_model):
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=server + "/v1", api_key="none")
    r = client.completions.create(model=SERVED, prompt=REPEATING, max_tokens=48, temperature=0,
                                  extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(str(qwen3_model))
    assert r.choices[0].text == tok.decode(mlx_greedy(qwen3_model, tok.encode(REPEATING), 48))
    counted = _metrics(server)
    drafted = counted["vllm:spec_decode_num_draft_tokens_total"]
    accepted = counted["vllm:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted < drafted, counted


def test_a_sampled_request_is_answered(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="none")
    r = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": REPEATING}],
                                       max_tokens=12, temperature=0.8, seed=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
