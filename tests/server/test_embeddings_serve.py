"""`vmetal serve EMBEDDING_MODEL` (issue 14): vLLM picks its pooling runner from the checkpoint's
sentence-transformers files, vmetal computes the vectors in MLX, and vLLM's own `/v1/embeddings` answers the
`openai` client.

One server (a start costs CI's two cores ~30 s): a batch of inputs comes back with transformers' reference
vectors (cosine ≥ 0.9999, unit length), `dimensions` cuts a Matryoshka vector, base64 encoding carries the same
floats, generation routes are absent (404), and the paged path is refused before anything starts.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.support.cli_server import CliServer
from tests.support.embeddings import cosine, reference_embeddings, tiny_embedding_model
from vmetal.server.process import free_port

pytestmark = pytest.mark.slow

SERVED = "tiny-embed"
INPUTS = ["The cat reads a book", "A small dog number 1 reads", "hello", "Our team opens the blue door near the "
          "station and everyone walks in"]


@pytest.fixture(scope="module")
def model(models_dir):
    return tiny_embedding_model(models_dir, seed=4)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("embeddings") / "serve.log"
    with CliServer(["serve", str(model), "--port", str(port), "--max-model-len", "256",
                    "--served-model-name", SERVED], log) as cli:
        cli.wait_for()
        yield f"http://127.0.0.1:{port}", cli


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server[0] + "/v1", api_key="-", max_retries=0, timeout=120) as c:
        yield c


def token_ids(model, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return [tok.encode(t) for t in texts]


def test_embeddings_equal_transformers_reference(server, client, model):
    res = client.embeddings.create(model=SERVED, input=INPUTS)
    assert [d.index for d in res.data] == list(range(len(INPUTS)))
    ids = token_ids(model, INPUTS)
    assert res.usage.prompt_tokens == sum(map(len, ids))
    for data, ref in zip(res.data, reference_embeddings(model, ids)):
        got = np.asarray(data.embedding)
        assert got.shape == (64,) and abs(np.linalg.norm(got) - 1) < 1e-5
        assert cosine(got, ref) >= 0.9999
    assert "embeddings: `/v1/embeddings`" in server[1].text()
    assert "tool calls:" not in server[1].text()


def test_dimensions_and_base64(client, model):
    res = client.embeddings.create(model=SERVED, input=INPUTS[:2], dimensions=16)
    refs = reference_embeddings(model, token_ids(model, INPUTS[:2]), dimensions=16)
    for data, ref in zip(res.data, refs):
        assert len(data.embedding) == 16 and cosine(data.embedding, ref) >= 0.9999
    raw = client.embeddings.with_raw_response.create(model=SERVED, input=INPUTS[0], encoding_format="base64")
    [item] = raw.http_response.json()["data"]
    floats = np.frombuffer(base64.b64decode(item["embedding"]), dtype=np.float32)
    plain = client.embeddings.create(model=SERVED, input=INPUTS[0]).data[0].embedding
    assert np.allclose(floats, plain, atol=1e-6)


def test_generation_routes_are_absent(server):
    import httpx

    r = httpx.post(server[0] + "/v1/completions", json={"model": SERVED, "prompt": "hi", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 404


def test_the_paged_path_is_refused_before_anything_starts(model, monkeypatch):
    from vmetal.cli.app import app

    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    r = CliRunner().invoke(app, ["serve", str(model), "--port", str(free_port())])
    assert r.exit_code == 2, r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [
        "error: embeddings run on the MLX-managed KV path only, and this server uses the paged path; leave out "
        "VLLM_METAL_USE_PAGED_ATTENTION=1 (`--paged`)"]


def test_chat_with_an_embedding_model_says_why_not_and_starts_nothing(model):
    from vmetal.cli.app import app

    r = CliRunner().invoke(app, ["chat", str(model), "--prompt", "hi"])
    assert r.exit_code == 2, r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: `{model}` is an embedding model: it computes vectors, not replies, so there is nothing to chat with"]
    assert "/v1/embeddings" in r.stderr
