"""`vmetal serve` of the families whose state is more than full-attention K/V (issue 14), over HTTP with the
`openai` client: gpt-oss (MoE, sliding-window layers with attention sinks: mlx-lm's RotatingKVCache), Qwen3-Next
(a hybrid: gated-DeltaNet recurrent layers, ArraysCache) and Falcon-H1 (a Mamba-2 state beside the K/V of every
layer, CacheList). `tests/engine/test_families.py` holds every family to mlx-lm through `LLM`; this holds the
served stack to it: the CLI's pre-flight lets each through on the MLX-managed path, vLLM's API server and its
hybrid settings start with them, and requests sent together, streamed or not, some joining while others decode,
come back with mlx-lm's greedy text and logprobs.

One server per family (a start costs CI's two cores ~30 s); tiny random checkpoints from mlx-lm's own classes.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.support.cli_server import CliServer
from tests.support.engine import mlx_greedy, sampled_logprobs_reference
from tests.support.families import build_family
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

SERVED = "tiny-family"
PROMPTS = [f"{w} number {i} reads" for i, w in enumerate(["The cat", "A small dog", "Our team", "The robot",
                                                           "Everyone", "The farmer"])]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["gpt_oss", "qwen3_next", "falcon_h1"])
def served(request, models_dir, tmp_path_factory):
    family = request.param
    path = models_dir / f"family-{family}"
    if not path.exists():
        build_family(path, family)
    port = free_port()
    log = tmp_path_factory.mktemp(family) / "serve.log"
    with CliServer(["serve", str(path), "--port", str(port), "--max-model-len", "256", "--served-model-name",
                    SERVED, "--", "--max-num-seqs", "8"], log) as cli:
        cli.wait_for()
        yield path, f"http://127.0.0.1:{port}/v1", cli


def test_requests_together_and_joining_get_mlx_lms_text_and_logprobs(served):
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    path, base, _ = served
    tok = AutoTokenizer.from_pretrained(str(path))

    async def one(client, i, prompt):
        await asyncio.sleep(0.4 * (i % 3))  # some join while the first ones decode
        kw = dict(model=SERVED, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        if i % 2:
            stream = await client.completions.create(stream=True, **kw)
            return "".join([c.choices[0].text async for c in stream if c.choices]), None
        out = await client.completions.create(logprobs=1, **kw)
        return out.choices[0].text, out.choices[0]

    async def together():
        async with AsyncOpenAI(base_url=base, api_key="-", max_retries=0, timeout=180) as client:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))

    for prompt, (text, choice) in zip(PROMPTS, asyncio.run(together())):
        ids = tok.encode(prompt)
        want = mlx_greedy(path, ids, MAX_TOKENS)
        assert text == tok.decode(want), (path.name, prompt)
        if choice is not None:
            assert choice.model_extra["token_ids"] == want
            ref = sampled_logprobs_reference(path, ids, want)
            got = choice.logprobs.token_logprobs
            assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, ref)), (path.name, got, ref)

