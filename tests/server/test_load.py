"""Load on one real server: many concurrent clients, and clients that go away, with nothing lost.

One `vmetal serve` process (the tiny random qwen3, `--max-num-seqs 64`) serves the module. The reference is
sequential: each (endpoint, prompt, max_tokens) combination is asked once, alone, before any load. Then:

- 256 requests at concurrency 64, streamed and not, completions and chat, prompts of 1 to ~150 tokens and
  1 to 24 output tokens: none fails, and each answer (token ids and text) equals its sequential answer.
- Clients that close a stream midway, reset the connection, time out a non-streamed request, or never read
  their stream, while other requests run beside them: the engine aborts the ones that left (the tokens it
  generated in all), its KV cache usage and running/waiting gauges return to their idle values, and the requests
  beside them get exactly their sequential answers.
- SIGTERM to `vmetal serve` (a server of its own) with 24 requests streaming: each ends whole or visibly cut short, the
  process exits 0, nothing it started is left, the port is free.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.loadclient import KINDS, PROMPTS, VmetalServe, launch, metrics, request_body, send, wait_running
from vmetal.server.process import check_port_free, free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 64
LENGTHS = (1, 7, 24)
CONCURRENCY = 64
REQUESTS = 256
LONG = 400  # output tokens of a request that a client abandons: it would run for seconds


class Served(VmetalServe):
    @property
    def base_url(self) -> str:
        return self.url

    @property
    def tail(self) -> list[str]:
        return self.lines


@contextlib.contextmanager
def serving(model):
    """`vmetal serve` as a user runs it (`--max-num-seqs 64`), closed (and its processes with it) on leaving."""
    served = Served(model, free_port())
    try:
        served.wait_serving()
        yield served
    finally:
        served.close()


@contextlib.contextmanager
def client(served):
    limits = httpx.Limits(max_connections=CONCURRENCY + 32, max_keepalive_connections=CONCURRENCY + 32)
    with httpx.Client(base_url=served.url + "/v1", timeout=120, limits=limits) as c:
        yield c


@pytest.fixture(scope="module")
def server(qwen3_model):
    with serving(qwen3_model) as served:
        yield served


@pytest.fixture(scope="module")
def http(server):
    with client(server) as c:
        yield c


@pytest.fixture(scope="module")
def reference(http):
    """The answer to every combination, each asked alone (non-streamed) before any load."""
    return {(kind, p, n): send(http, MODEL, kind, PROMPTS[p], n, stream=False)
            for kind in KINDS for p in range(len(PROMPTS)) for n in LENGTHS}


def idle_metrics(http, server, timeout: float = 30.0) -> dict[str, float]:
    """The metrics once nothing runs or waits (vLLM updates its gauges every engine step or log interval)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http, server.base_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, (
            f"the engine is not idle {timeout:g} s after the load: running {m['vllm:num_requests_running']}, "
            f"waiting {m['vllm:num_requests_waiting']}, KV usage {m['vllm:kv_cache_usage_perc']:.4f}\n"
            + "\n".join(server.tail[-20:]))
        time.sleep(0.2)


class Peak:
    """Polls the running + waiting gauges while a burst runs: proof the load really overlapped."""

    def __init__(self, http, server) -> None:
        self.http, self.server, self.value = http, server, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            m = metrics(self.http, self.server.base_url)
            self.value = max(self.value, m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"])
            time.sleep(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_256_mixed_requests_at_concurrency_64_equal_their_sequential_answers(http, server, reference):
    rng = random.Random(7)
    combos = sorted(reference)
    jobs = [(combos[i % len(combos)], i % 2 == 1) for i in range(REQUESTS)]  # every combination, both ways
    rng.shuffle(jobs)

    def one(job):
        (kind, p, n), stream = job
        try:
            return job, send(http, MODEL, kind, PROMPTS[p], n, stream), None
        except Exception as exc:  # noqa: BLE001 - every failure is reported below, with its request
            return job, None, f"{type(exc).__name__}: {exc}"

    started = time.monotonic()
    with Peak(http, server) as peak, ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, jobs))
    elapsed = time.monotonic() - started

    failed = [(job, err) for job, _, err in results if err]
    assert failed == [], f"{len(failed)} of {REQUESTS} failed, e.g. {failed[:3]}"
    wrong = [(job, reply, reference[job[0]]) for job, reply, _ in results if reply != reference[job[0]]]
    assert wrong == [], f"{len(wrong)} of {REQUESTS} differ from their sequential answer, e.g. {wrong[:2]}"
    assert peak.value >= 16, f"at most {peak.value:g} requests were in the engine at once"
    print(f"\n{REQUESTS} requests at concurrency {CONCURRENCY}: {elapsed:.1f} s, peak {peak.value:g} in the engine")
    idle_metrics(http, server)


# ---------------------------------------------------------------------------------------------------------
# Clients that go away


def raw_request(server, kind: str, prompt: str, max_tokens: int) -> socket.socket:
    """A streamed request over a bare socket, sent and not read: what a client that never reads does."""
    import json

    path, body = request_body(MODEL, kind, prompt, max_tokens, stream=True)
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN, as a killed client or a dropped network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_that_leave_free_their_kv_and_others_are_unaffected(http, server, reference):
    before = idle_metrics(http, server)
    witnesses = [(combo, stream) for combo in sorted(reference) for stream in (False, True)]
    left = {"closed mid-stream": 0, "reset mid-stream": 0, "timed out": 0}
    never_read: list[socket.socket] = []

    def close_mid_stream(i: int) -> None:
        path, body = request_body(MODEL, KINDS[i % 2], PROMPTS[i % len(PROMPTS)], LONG, stream=True)
        with http.stream("POST", path, json=body) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 6:
                    break  # leaving the block closes the connection with the answer half read
        left["closed mid-stream"] += 1

    def reset_mid_stream(i: int) -> None:
        sock = raw_request(server, KINDS[i % 2], PROMPTS[i % len(PROMPTS)], LONG)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        reset(sock)
        left["reset mid-stream"] += 1

    def time_out(i: int) -> None:
        path, body = request_body(MODEL, KINDS[i % 2], PROMPTS[i % len(PROMPTS)], LONG, stream=False)
        # A non-streamed answer comes only after all LONG tokens: hundreds of engine steps, each of which costs
        # the host more than a millisecond on any machine, so 0.05 s without a byte is a timeout everywhere.
        with pytest.raises(httpx.ReadTimeout):
            http.post(path, json=body, timeout=httpx.Timeout(120, read=0.05))
        left["timed out"] += 1

    def witness(job):
        (kind, p, n), stream = job
        return job, send(http, MODEL, kind, PROMPTS[p], n, stream)

    never_read = [raw_request(server, KINDS[i % 2], PROMPTS[i % len(PROMPTS)], LONG) for i in range(4)]
    with Peak(http, server) as peak, ThreadPoolExecutor(48) as pool:
        leaving = [pool.submit(f, i) for i in range(8) for f in (close_mid_stream, reset_mid_stream, time_out)]
        answers = list(pool.map(witness, witnesses))
        for future in leaving:
            future.result()
    wrong = [(job, reply) for job, reply in answers if reply != reference[job[0]]]
    assert wrong == [], f"{len(wrong)} requests beside the departing clients changed, e.g. {wrong[:2]}"
    assert left == {"closed mid-stream": 8, "reset mid-stream": 8, "timed out": 8}
    assert peak.value >= 24

    for sock in never_read:
        reset(sock)
    after = idle_metrics(http, server)
    # vLLM counts a client's abort in no counter, but in the tokens generated: had the 24 abandoned requests
    # run on to their 400th token, they alone would have made 9,600. (The never-read ones may have finished:
    # their answers fit in the socket buffers.)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    budget = sum(combo[2] for combo, _ in witnesses) + len(never_read) * LONG + 24 * LONG // 4
    print(f"\n{generated:g} tokens generated in all; at most {budget} if the departed requests were aborted")
    assert generated <= budget, f"{generated:g} tokens generated: the abandoned requests ran on"
    assert after["vllm:kv_cache_usage_perc"] == before["vllm:kv_cache_usage_perc"] == 0
    # And the server answers as before.
    assert send(http, MODEL, "chat", PROMPTS[3], 24, stream=True) == reference[("chat", 3, 24)]


# ---------------------------------------------------------------------------------------------------------
# SIGTERM to `vmetal serve` while requests stream, on a server of its own (the module's keeps serving the
# others, in whatever order they run). Every request ends,
# whole (its exact answer) or cut short in a way its client can tell (finish_reason `abort`, an error
# event, a broken connection), never a shorter answer passed off as complete, never a hang; `vmetal serve`
# exits 0, no process it started is left, and the port can be listened on again.

SIGTERM_TOKENS = 200
IN_FLIGHT = 24


@pytest.fixture
def doomed(qwen3_model):
    """A server this test stops itself: (the server, a client of it)."""
    with serving(qwen3_model) as served, client(served) as http:
        yield served, http


def test_sigterm_during_load_ends_every_request_cleanly_and_leaves_nothing(doomed):
    server, http = doomed
    jobs = [(KINDS[i % 2], i % 3, i % 4 < 2) for i in range(IN_FLIGHT)]  # prompts 0-2 fit LONG in 512
    reference = {(kind, p): send(http, MODEL, kind, PROMPTS[p], SIGTERM_TOKENS, stream=False)
                 for kind in KINDS for p in range(3)}
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = launch(pool, http, MODEL, jobs, SIGTERM_TOKENS)
        wait_running(http, server.url, 8)
        os.kill(server.proc.pid, signal.SIGTERM)
        stopped = time.monotonic()
        outcomes = [f.result(timeout=60) for f in futures]

    whole = cut = failed = 0
    for (kind, p, stream), reply, exc in outcomes:
        ref = reference[(kind, p)]
        if exc is not None:
            failed += 1  # the client was told: an exception, not an answer
        elif reply == ref:
            whole += 1
        else:
            assert reply.finish_reason == "abort", f"a {kind} answer cut short passed as complete: {reply}"
            assert reply.token_ids == ref.token_ids[:len(reply.token_ids)], "what arrived before the stop differs"
            cut += 1
    assert cut + failed > 0, "every request finished before the SIGTERM: the test did not test it"

    code = server.proc.wait(60)
    took = time.monotonic() - stopped
    assert code == 0, server.output()
    assert any(line.startswith("vmetal: stopping the server") for line in server.lines), server.output()
    assert server.leftovers() == []
    check_port_free("127.0.0.1", server.port)  # raises PortInUseError if anything still holds it
    print(f"\nSIGTERM with {IN_FLIGHT} requests in flight: {whole} whole, {cut} ended `abort`, {failed} errors; "
          f"exit 0 after {took:.1f} s")
