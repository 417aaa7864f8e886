"""The paged KV path behind vLLM's OpenAI server: 32 concurrent streams, exact greedy text."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.support.engine import mlx_greedy
from vmetal import envs
from vmetal.server.process import ServerProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "tiny-paged"
WORDS = ["The cat", "A small dog", "Our team", "The robot", "Everyone", "The farmer", "My friend", "The model"]


@pytest.fixture(scope="module")
def server(qwen3_model, tmp_path_factory):
    cfg = envs.load_config({envs.USE_PAGED_ATTENTION: "1", envs.MEMORY_FRACTION: "0.2"})
    proc = ServerProcess(str(qwen3_model), host="127.0.0.1", port=free_port(), served_model_name=MODEL,
                         config=cfg, vllm_args=["--max-model-len", "256", "--max-num-seqs", "32"], echo=False,
                         log_path=tmp_path_factory.mktemp("paged-server") / "server.log")
    with proc:
        yield proc


def test_thirty_two_concurrent_streams_complete_with_exact_greedy_text(server, qwen3_model):
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen3_model))
    prompts = [f"{WORDS[i % 8]} number {i} reads" + " and writes" * (i % 5) for i in range(32)]

    async def one(client, prompt):
        text, chunks, finish = "", 0, None
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            chunks += 1
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, chunks, finish

    async def all_streams():
        client = AsyncOpenAI(base_url=server.url, api_key="-", max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_streams())
    for prompt, (text, chunks, finish) in zip(prompts, results):
        expected = tok.decode(mlx_greedy(qwen3_model, tok.encode(prompt), 16))
        assert finish == "length" and chunks > 1
        assert text == expected


PROBE = """
import sys
from vllm import LLM
if __name__ == "__main__":
    LLM(model=sys.argv[1], max_model_len=2048)
    print("STARTED")
"""


def test_a_budget_below_one_sequence_stops_start_up_naming_the_setting(qwen3_model, tmp_path):
    import os

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "VMETAL_ENABLE": "1", envs.USE_PAGED_ATTENTION: "1", envs.MEMORY_FRACTION: "0.00001"}
    out = subprocess.run([sys.executable, str(probe), str(qwen3_model)], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=180)
    assert out.returncode != 0 and "STARTED" not in out.stdout
    assert "set VLLM_METAL_MEMORY_FRACTION to at least" in out.stderr
    assert "lower --max-model-len to 0" not in out.stderr  # no length fits: the fraction is the fix
