"""`vmetal serve MODEL -- --pipeline-parallel-size 2` (issue 16): vLLM's own API server in front of one engine
whose model is split in two stages, a worker process each, hidden states passed over MLX's ring.

One server (a start costs CI's two cores ~30 s): concurrent streamed and plain greedy requests come back with
mlx-lm's own text (vLLM keeps two batches in flight, one per stage), each stage says which layers it holds and
plans its KV with half the memory, and stopping the CLI leaves no process.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.support.cli_server import CliServer
from tests.support.engine import mlx_greedy
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

SERVED = "tiny-pipeline"
PROMPTS = [f"{w} number {i} reads" for i, w in enumerate(["The cat", "A small dog", "Our team", "The robot",
                                                           "Everyone", "The farmer", "My friend", "The model"])]


@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("pipeline") / "serve.log"
    argv = ["serve", str(qwen3_model), "--port", str(port), "--max-model-len", "256", "--served-model-name", SERVED,
            "--", "--pipeline-parallel-size", "2"]
    with CliServer(argv, log) as server:
        server.wait_for()
        yield f"http://127.0.0.1:{port}", log, server


def test_two_stages_answer_with_mlx_lms_text(server, qwen3_model):
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    base, log, cli = server
    tok = AutoTokenizer.from_pretrained(str(qwen3_model))

    async def one(client, i, prompt):
        if i % 2:
            out = await client.completions.create(model=SERVED, prompt=prompt, max_tokens=12, temperature=0,
                                                  extra_body={"ignore_eos": True})
            return out.choices[0].text
        stream = await client.completions.create(model=SERVED, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def together():
        async with AsyncOpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))

    for prompt, text in zip(PROMPTS, asyncio.run(together())):
        assert text == tok.decode(mlx_greedy(qwen3_model, tok.encode(prompt), 12)), prompt
    text = log.read_text()
    stages = sorted(set(re.findall(r"vmetal: (pipeline stage \d of 2: layers [\d-]+ of 2)", text)))
    assert stages == ["pipeline stage 1 of 2: layers 0-0 of 2", "pipeline stage 2 of 2: layers 1-1 of 2"], stages
    shares = re.findall(r"vmetal: KV budget .*\(a 1/(\d) share\)", text)
    assert shares == ["2"] * 2, shares  # two workers on one machine, each planning with half

    # Stopping the CLI stops every rank: nothing of its process group outlives it.
    cli.assert_stops_with_its_group()
