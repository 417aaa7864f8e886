"""Two "Macs" as two network namespaces joined by a veth pair (issue 16): `vmetal serve` on each, the head with
the API, the other `--headless`, talking over the pair's addresses only, never 127.0.0.1.

- Tensor and pipeline parallel across the nodes: one rank (a half of every layer, or half of the layers)
  each; MLX's ring and vLLM's gloo group run over the veth addresses (each rank's log names its ring address);
  greedy text equals mlx-lm's.
- Data parallel across the nodes: one replica each behind the head's API server; both answer requests.
- A rank killed mid-generation: the head exits non-zero within a bounded time instead of hanging.

The namespaces and the pair are made by the fixture and removed after; where they cannot be made (not root,
no `ip`), the module is skipped with the reason. The client runs inside the head's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.cli_server import CliServer
from tests.support.engine import mlx_greedy
from tests.support.netns import Host, two_hosts

pytestmark = pytest.mark.slow

SERVED = "tiny-nodes"
PROMPTS = ["The cat number 0 reads", "A small dog number 1 reads", "Our team number 2 reads", "The robot reads"]


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


def node(host: Host, argv: list[str], log: Path) -> CliServer:
    """`vmetal serve ARGV` inside `host`'s namespace, advertising its address."""
    return CliServer(["serve", *argv], log, {**os.environ, "VLLM_HOST_IP": host.address},
                     prefix=["ip", "netns", "exec", host.netns])


CLIENT = textwrap.dedent("""
    import asyncio, json, sys, urllib.request
    from openai import AsyncOpenAI
    base, model, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    async def main():
        async with AsyncOpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120) as c:
            outs = await asyncio.gather(*(c.completions.create(model=model, prompt=p, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True}) for p in prompts))
        return [o.choices[0].text for o in outs]
    texts = asyncio.run(main())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    metrics = opener.open(base + "/metrics", timeout=30).read().decode()
    print(json.dumps({"texts": texts, "metrics": metrics}))
""")


def ask(host: Host, port: int, prompts: list[str]) -> dict:
    """Completions (and /metrics) from inside `host`'s namespace, where the head's API listens."""
    out = subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-c", CLIENT,
                          f"http://127.0.0.1:{port}", SERVED, json.dumps(prompts)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def expected(model: Path, prompt: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return tok.decode(mlx_greedy(model, tok.encode(prompt), 10))


def common(model: Path, port: int) -> list[str]:
    return [str(model), "--port", str(port), "--max-model-len", "256", "--served-model-name", SERVED, "--"]


@pytest.mark.parametrize("split", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_a_model_split_across_two_hosts(hosts, qwen3_model, tmp_path, split):
    a, b = hosts
    rendezvous = [split, "2", "--nnodes", "2", "--master-addr", a.address, "--master-port", "29517"]
    node_b = node(b, common(qwen3_model, 8000) + rendezvous + ["--node-rank", "1", "--headless"], tmp_path / "b.log")
    head = node(a, common(qwen3_model, 8000) + rendezvous + ["--node-rank", "0"], tmp_path / "a.log")
    try:
        head.wait_for("vmetal: serving")
        answer = ask(a, 8000, PROMPTS)
        assert answer["texts"] == [expected(qwen3_model, p) for p in PROMPTS]
        # Each rank on its own host, the ring between the pair's addresses.
        assert f"rank 0 of 2 joined MLX's ring at {a.address}:" in head.text()
        assert f"rank 1 of 2 joined MLX's ring at {b.address}:" in node_b.text()
        assert "headless node for tiny-nodes: its workers join the head node at " + a.address in node_b.text()
        if split == "--pipeline-parallel-size":  # the first layer on the head, the second across the pair
            assert "pipeline stage 1 of 2: layers 0-0 of 2" in head.text()
            assert "pipeline stage 2 of 2: layers 1-1 of 2" in node_b.text()
    finally:
        assert head.stop() == 0
        assert node_b.stop() == 0


def test_data_parallel_across_two_hosts(hosts, qwen3_model, tmp_path):
    a, b = hosts
    rendezvous = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address",
                  a.address, "--data-parallel-rpc-port", "29519"]
    head = node(a, common(qwen3_model, 8000) + rendezvous, tmp_path / "a.log")
    node_b = node(b, common(qwen3_model, 8000) + rendezvous + ["--headless", "--data-parallel-start-rank", "1"],
                  tmp_path / "b.log")
    try:
        head.wait_for("vmetal: serving")
        prompts = PROMPTS * 2
        answer = ask(a, 8000, prompts)
        assert answer["texts"] == [expected(qwen3_model, p) for p in prompts]
        served = {}
        for line in answer["metrics"].splitlines():
            if line.startswith("vllm:request_success_total{"):
                engine = line.split('engine="')[1].split('"')[0]
                served[engine] = served.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
        assert set(served) == {"0", "1"} and min(served.values()) > 0, served
    finally:
        assert head.stop() == 0
        assert node_b.stop() == 0


def test_a_rank_killed_mid_generation_stops_the_head_naming_it(hosts, qwen3_model, tmp_path):
    """The worker of rank 1 (node B) is killed while a long request runs: rank 0 (the head) finds MLX's ring
    broken at its next all-reduce, the engine stops, and `vmetal serve` exits 1 within a bounded time with a
    line naming the rank, instead of hanging with a request in flight."""
    import psutil

    a, b = hosts
    rendezvous = ["--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", a.address,
                  "--master-port", "29521"]
    node_b = node(b, common(qwen3_model, 8000) + rendezvous + ["--node-rank", "1", "--headless"], tmp_path / "b.log")
    head = node(a, [str(qwen3_model), "--port", "8000", "--max-model-len", "2048", "--served-model-name", SERVED,
                    "--", *rendezvous, "--node-rank", "0"], tmp_path / "a.log")
    try:
        head.wait_for("vmetal: serving")
        long = subprocess.Popen(["ip", "netns", "exec", a.netns, "curl", "-s", "http://127.0.0.1:8000/v1/completions",
                                 "-H", "Content-Type: application/json", "-d",
                                 json.dumps({"model": SERVED, "prompt": "Hello", "max_tokens": 2000,
                                             "temperature": 0, "ignore_eos": True})],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        assert long.poll() is None, "the long request ended before the kill"
        [worker] = [p for p in psutil.Process(node_b.proc.pid).children(recursive=True)
                    if "Worker_TP1" in " ".join(p.cmdline())]
        worker.kill()
        started = time.monotonic()
        assert head.proc.wait(120) == 1
        assert time.monotonic() - started < 120
        [line] = [line for line in head.text().splitlines() if line.startswith("error: ")]
        assert line == ("error: the vLLM server exited by itself with code 0 while serving: tensor-parallel rank 0 "
                        "lost MLX's ring: another rank or its node stopped"), line
        long.wait(30)
    finally:
        head.stop()
        node_b.stop()
