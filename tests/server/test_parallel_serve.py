"""`vmetal serve MODEL -- --data-parallel-size 2 --tensor-parallel-size 2` (issue 16): vLLM's own API server in
front of two engine replicas, each split over two MLX ranks, all four on this machine.

One server for both modes (each start costs CI's two cores ~30 s): concurrent greedy requests come back with
mlx-lm's own text, both replicas answered some of them (vLLM's per-engine counters in `/metrics`), each of the
four workers planned its KV with a quarter of the memory (its log line), and stopping the CLI leaves no process.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from tests.support.cli_server import CliServer
from tests.support.engine import mlx_greedy
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

SERVED = "tiny-parallel"
PROMPTS = [f"{w} number {i} reads" for i, w in enumerate(["The cat", "A small dog", "Our team", "The robot",
                                                           "Everyone", "The farmer", "My friend", "The model"])]


@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("parallel") / "serve.log"
    argv = ["serve", str(qwen3_model), "--port", str(port), "--max-model-len", "256", "--served-model-name", SERVED,
            "--", "--data-parallel-size", "2", "--tensor-parallel-size", "2"]
    with CliServer(argv, log) as server:
        server.wait_for()
        yield f"http://127.0.0.1:{port}", log, server


def _metric_by_engine(base: str, name: str) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(base + "/metrics", timeout=30).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            totals[engine] = totals.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_two_replicas_of_two_ranks_answer_with_mlx_lms_text(server, qwen3_model):
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    base, log, cli = server
    tok = AutoTokenizer.from_pretrained(str(qwen3_model))

    async def one(client, prompt):
        out = await client.completions.create(model=SERVED, prompt=prompt, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
        return out.choices[0].text

    async def together():
        async with AsyncOpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    for prompt, text in zip(PROMPTS, asyncio.run(together())):
        assert text == tok.decode(mlx_greedy(qwen3_model, tok.encode(prompt), 12)), prompt
    served = _metric_by_engine(base, "vllm:request_success_total")
    assert set(served) == {"0", "1"} and all(n > 0 for n in served.values()) and sum(served.values()) >= 8, served
    shares = re.findall(r"vmetal: KV budget .*\(a 1/(\d) share\)", log.read_text())
    assert shares == ["4"] * 4, shares  # four workers on one machine, each planning with a quarter

    # Stopping the CLI stops every rank: nothing of its process group outlives it.
    cli.assert_stops_with_its_group()
