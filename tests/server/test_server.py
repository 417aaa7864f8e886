"""vLLM's own OpenAI server with the vmetal plugin, end to end over HTTP.

One real server (`ServerProcess`, the tiny random qwen3 model) serves every test of this module; each test
checks what a client sees: the exact greedy tokens and text mlx-lm produces, streamed text equal to the
non-streamed text, concurrent requests equal to sequential ones, and 4xx answers (with a message naming the
problem) for requests the server or the plugin refuses, after which the server still serves.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.engine import mlx_greedy

pytestmark = pytest.mark.slow

from tests.support.servers import MAX_MODEL_LEN, MAX_NUM_SEQS
from tests.support.servers import SERVED as MODEL

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def server(default_server):
    """The session's shared server (tests/support/servers.py), which also checks that it stops cleanly."""
    return default_server


@pytest.fixture(scope="module")
def client(default_client):
    return default_client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(qwen3_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_model))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def greedy(client, prompt, max_tokens: int = 12, **kwargs):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, **kwargs.pop("extra_body", {})},
                                     **kwargs)


def greedy_chat(client, messages, max_tokens: int = 12, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, extra_body={"ignore_eos": True}, **kwargs)


def log_tail(server, n: int = 30) -> str:
    return "server log tail:\n" + "\n".join(server.tail[-n:])


# ---------------------------------------------------------------------------------------------------------
# Happy paths


def test_models_lists_served_name(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = http.get("/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_engine_core_runs_in_the_interpreter_started_with_the_server(server):
    """The start-up overlap (vmetal/server/prestart.py) is in use: vLLM's EngineCore (named by vLLM's
    setproctitle, which must keep working there) is the interpreter the API server started before importing
    vLLM: born within a moment of the API server, not after its ~7 s of imports as a spawned one would be."""
    import psutil

    api = psutil.Process(server.pid)
    [engine] = [child for child in api.children() if child.name() == "VLLM::EngineCore"]
    assert engine.create_time() - api.create_time() < 3.0
    assert f"(EngineCore pid={engine.pid})" in server.log_path.read_text()


def test_completion_greedy_matches_mlx_lm(client, tokenizer, qwen3_model):
    prompt_ids = encode(tokenizer, PROMPT)
    expected = mlx_greedy(qwen3_model, prompt_ids, 12)
    assert len(expected) == 12

    res = greedy(client, PROMPT, extra_body={"return_token_ids": True})
    choice = res.choices[0]
    extra = choice.model_extra
    assert extra["prompt_token_ids"] == prompt_ids
    assert extra["token_ids"] == expected
    assert choice.text == tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert res.usage.prompt_tokens == len(prompt_ids) and res.usage.completion_tokens == 12

    # Token ids as the prompt give the same answer as the text.
    by_ids = greedy(client, prompt_ids)
    assert by_ids.choices[0].text == choice.text


def test_chat_applies_template(client, tokenizer, qwen3_model):
    ids = chat_ids(tokenizer, CHAT)
    # The template really wraps the message: the prompt is longer than the bare content.
    assert len(ids) > len(encode(tokenizer, CHAT[0]["content"]))
    res = greedy_chat(client, CHAT, max_tokens=10)
    assert res.usage.prompt_tokens == len(ids)
    assert res.usage.completion_tokens == 10
    choice = res.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    # The reply is mlx-lm's greedy continuation of the templated prompt.
    assert choice.message.content == tokenizer.decode(mlx_greedy(qwen3_model, ids, 10))


def test_streaming_completion_equals_non_streamed(client):
    expected = greedy(client, PROMPT, max_tokens=16).choices[0].text
    chunks, finish = [], None
    for event in greedy(client, PROMPT, max_tokens=16, stream=True):
        for c in event.choices:
            if c.text:
                chunks.append(c.text)
            finish = c.finish_reason or finish
    assert len(chunks) > 1
    assert "".join(chunks) == expected
    assert finish == "length"


def test_streaming_chat_equals_non_streamed(client):
    expected = greedy_chat(client, CHAT, max_tokens=16).choices[0].message.content
    chunks, finish, roles = [], None, set()
    for event in greedy_chat(client, CHAT, max_tokens=16, stream=True):
        for c in event.choices:
            if c.delta.role:
                roles.add(c.delta.role)
            if c.delta.content:
                chunks.append(c.delta.content)
            finish = c.finish_reason or finish
    assert roles == {"assistant"}
    assert len(chunks) > 1
    assert "".join(chunks) == expected
    assert finish == "length"


def test_concurrent_streams_equal_sequential_results(client):
    # Prompts of different lengths, so the batch mixes prefills and decodes of different sizes.
    prompts = [f"Request {i}: " + "once upon a time " * (i % 5) + f"number {i * 7}" for i in range(MAX_NUM_SEQS)]
    expected = [greedy(client, p, max_tokens=16).choices[0].text for p in prompts]
    assert len(set(expected)) > 1

    def stream(prompt):
        parts, finish = [], None
        for event in greedy(client, prompt, max_tokens=16, stream=True):
            for c in event.choices:
                parts.append(c.text or "")
                finish = c.finish_reason or finish
        return "".join(parts), finish

    with ThreadPoolExecutor(MAX_NUM_SEQS) as pool:
        results = list(pool.map(stream, prompts))
    assert [finish for _, finish in results] == ["length"] * MAX_NUM_SEQS
    for i, (text, _) in enumerate(results):
        assert text == expected[i], f"request {i}"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed, n=1):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed, n=n, extra_body={"ignore_eos": True})

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text
    # Sampling really sampled: not the greedy text.
    assert first.choices[0].text != greedy(client, PROMPT, max_tokens=16).choices[0].text

    many = sample(7, n=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.text and c.finish_reason == "length" for c in many.choices)
    assert many.usage.completion_tokens == 3 * 16
    # Each choice gets its own seed (seed + index): they differ, and the whole answer is reproducible.
    assert len({c.text for c in many.choices}) == 3
    assert [c.text for c in sample(7, n=3).choices] == [c.text for c in many.choices]


def test_stop_string_truncates_before_it(client):
    text = greedy(client, PROMPT, max_tokens=24).choices[0].text
    # A 3-character stop string from the middle whose first occurrence is not at the start.
    stop = next(s for i in range(len(text) // 2, len(text) - 3)
                if (s := text[i:i + 3]).strip() and text.find(s) > 0)
    res = greedy(client, PROMPT, max_tokens=24, stop=[stop])
    choice = res.choices[0]
    assert choice.text == text[:text.find(stop)]
    assert choice.finish_reason == "stop"
    assert choice.model_extra.get("stop_reason") == stop


def test_completion_logprobs(client):
    res = greedy(client, PROMPT, max_tokens=8, logprobs=3)
    choice = res.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) in (3, 4)
        assert all(v <= 0 for v in top.values())
        assert logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert token in top and top[token] == pytest.approx(max(top.values()))
        assert logprob == pytest.approx(top[token])


# ---------------------------------------------------------------------------------------------------------
# Refused requests: 4xx with a message naming the problem; the server keeps serving.


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert "error" in body, body
    message = body["error"]["message"]
    assert message
    return message


# Requests vLLM itself refuses before they reach the engine.
LONG_PROMPT = "hello world " * MAX_MODEL_LEN  # longer than the context: each repetition is two tokens or more
VLLM_REFUSED = {
    "over-long prompt": ("/completions", {"prompt": LONG_PROMPT}, 400, [str(MAX_MODEL_LEN), "length"]),
    "max_tokens -1": ("/completions", {"max_tokens": -1}, 400, ["max_tokens"]),
    "temperature -1": ("/completions", {"temperature": -1}, 400, ["temperature"]),
    "unknown model": ("/completions", {"model": "no-such-model"}, 404, ["no-such-model"]),
}


def request_body(path: str, fields: dict) -> dict:
    if path == "/chat/completions":
        base = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
    else:
        base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
    return {**base, **fields}


def check_refused(http, server, case):
    path, fields, status, words = case
    r = http.post(path, json=request_body(path, fields))
    assert r.status_code == status, r.text + "\n" + log_tail(server, 8)
    msg = error_of(r)
    for word in words:
        assert word in msg.lower() or word in msg, msg


def test_long_prompt_is_over_max_model_len(tokenizer):
    assert len(encode(tokenizer, LONG_PROMPT)) > MAX_MODEL_LEN


@pytest.mark.parametrize("case", VLLM_REFUSED.values(), ids=VLLM_REFUSED.keys())
def test_invalid_requests_get_4xx_with_message(http, server, case):
    check_refused(http, server, case)


def test_echo_with_logprobs_returns_the_prompt_tokens_logprobs(client, qwen3_model, tokenizer):
    from tests.support.engine import prompt_logprobs_reference

    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                  logprobs=1)
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT)
    ids = encode(tokenizer, PROMPT)
    values = choice.logprobs.token_logprobs
    # The first prompt token has no logprob; each later one equals mlx-lm's log-softmax over the prompt.
    assert values[0] is None
    ref = prompt_logprobs_reference(qwen3_model, ids, top_k=1)
    assert values[1 : len(ids)] == pytest.approx([lp for lp, _, _ in ref], abs=1e-4)
    assert all(v <= 0 for v in values[len(ids):]) and len(values) == len(ids) + 4


def test_server_keeps_serving_after_refused_requests(http, client, server):
    """Each refused request gets exactly the 4xx it deserves (not any error status), and the same server
    then serves the same greedy text as before."""
    before = greedy(client, PROMPT, max_tokens=8).choices[0].text
    for case in VLLM_REFUSED.values():
        check_refused(http, server, case)
    assert server.returncode is None
    assert http.get(str(server.base_url) + "/health").status_code == 200
    after = greedy(client, PROMPT, max_tokens=8)
    assert after.choices[0].text == before and after.choices[0].finish_reason == "length"
    chat = greedy_chat(client, CHAT, max_tokens=4)
    assert chat.choices[0].message.content and chat.choices[0].finish_reason == "length"
