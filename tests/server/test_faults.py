"""A worker that dies under load, against a real `vmetal serve`: its EngineCore killed with SIGKILL.

The requests in flight fail (an error their client sees, not a hang), `/health` stops answering, and
`vmetal serve` exits non-zero with an `error:` line, leaving no process behind and the port free.
(SIGTERM during load is the last test of test_load.py, which ends that module's server.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.loadclient import KINDS, VmetalServe, launch, wait_running
from vmetal.server.process import check_port_free, free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"
LONG = 200  # output tokens: a request that is still running when the fault comes


@pytest.fixture
def vmetal_serve(qwen3_model):
    server = VmetalServe(qwen3_model, free_port())
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


def test_a_killed_engine_makes_serve_fail_loudly_never_hang(vmetal_serve):
    server = vmetal_serve
    jobs = [(KINDS[i % 2], i % 3, i % 2 == 0) for i in range(8)]
    with httpx.Client(base_url=server.url + "/v1", timeout=60) as http:
        with ThreadPoolExecutor(8) as pool:
            futures = launch(pool, http, MODEL, jobs, LONG)
            wait_running(http, server.url, 4)
            [engine] = [p for p in server.children if p.name() == "VLLM::EngineCore"]
            engine.kill()
            killed = time.monotonic()
            outcomes = [f.result(timeout=60) for f in futures]
    # Each request in flight ends in an error its client sees (an error event, a 5xx, a broken connection).
    assert [job for job, reply, exc in outcomes if exc is None and reply.finish_reason == "length"] == []
    assert all(exc is not None for _, _, exc in outcomes), [(job, reply) for job, reply, _ in outcomes]

    code = server.proc.wait(60)
    took = time.monotonic() - killed
    assert code == 1, server.output()
    assert any(line.startswith("error: the vLLM server exited by itself") for line in server.lines), \
        server.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
    assert server.leftovers() == []
    check_port_free("127.0.0.1", server.port)
    print(f"\nEngineCore killed with 8 requests in flight: 8 errors, `vmetal serve` exit 1 after {took:.1f} s")
