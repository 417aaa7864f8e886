"""One real `vllm serve` of the tiny qwen3 model with the plugin, shared by every test module that needs
nothing special of a server (tests/server/test_server.py, tests/cli/test_bench.py,
tests/engine/test_structured_output.py): each start costs 10-20 s of CI's two cores. Modules that need a
server of their own settings (a key, the paged path, another served name, a fuzzer's hostile traffic, a kill)
start their own. Loaded by tests/conftest.py as a pytest plugin."""

from __future__ import annotations

import pytest

from vmetal.server.process import ServerProcess, free_port

SERVED = "tiny"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16


@pytest.fixture(scope="session")
def default_server(qwen3_model, tmp_path_factory):
    """Ready when returned; stopped at the end of the session, leaving no process of its group behind."""
    log = tmp_path_factory.mktemp("default-server") / "server.log"
    proc = ServerProcess(str(qwen3_model), host="127.0.0.1", port=free_port(), served_model_name=SERVED,
                         vllm_args=["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS)],
                         echo=False, log_path=log)
    with proc:
        yield proc
    assert not proc._group_alive()


@pytest.fixture(scope="session")
def default_client(default_server):
    """The `openai` client of the shared server (no retries: a failure shows as it is)."""
    from openai import OpenAI

    with OpenAI(base_url=default_server.url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client
