"""Which parallel sizes vmetal serves, refused in one line before anything starts (issue 16): by `vmetal serve`'s
pre-flight from vLLM's arguments and the model's config.json (exit 2, no server), and by the platform from
vLLM's resolved config (tests/engine/test_tensor_parallel.py shows that one through `LLM`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vmetal.cli.app import app
from vmetal.preflight import parallel
from vmetal.server.process import ServerProcess, free_port

QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_attention_heads": 4,
         "num_key_value_heads": 2}


@pytest.mark.parametrize("args, sizes", [
    ([], {"tensor": 1, "pipeline": 1, "data": 1}),
    (["--tensor-parallel-size", "2"], {"tensor": 2, "pipeline": 1, "data": 1}),
    (["--tensor_parallel_size=4", "-dp", "3"], {"tensor": 4, "pipeline": 1, "data": 3}),
    (["-tp=2", "-pp", "2", "--max-model-len", "64"], {"tensor": 2, "pipeline": 2, "data": 1}),
    (["-tp", "2", "--tensor-parallel-size", "8"], {"tensor": 8, "pipeline": 1, "data": 1}),  # the last one wins
    (["-tp", "two"], {"tensor": 1, "pipeline": 1, "data": 1}),  # vLLM's own parser reports that one
])
def test_sizes_as_vllms_parser_reads_them(args, sizes):
    assert parallel.sizes_in_args(args) == sizes


@pytest.mark.parametrize("sizes, config, kv_path, words", [
    ((1, 2, 1), QWEN3, "torch", "`--pipeline-parallel-size 2`: pipeline parallel needs the MLX compute path"),
    ((2, 2, 1), QWEN3, "mlx", "`--pipeline-parallel-size 2` with --tensor-parallel-size: vmetal's engine runs one"),
    ((1, 2, 2), QWEN3, "mlx", "`--pipeline-parallel-size 2` with --data-parallel-size: vmetal's engine runs one"),
    ((1, 2, 1), {**QWEN3, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}, "mlx",
     "`--pipeline-parallel-size 2`: mlx-lm's `gemma3_text` model is not one vmetal splits into stages"),
    ((2, 1, 1), QWEN3, "torch", "`--tensor-parallel-size 2`: tensor parallel needs the MLX compute path"),
    ((3, 1, 1), QWEN3, "mlx", "`--tensor-parallel-size 3`: the model's 2 KV heads cannot be split across 3 ranks; "
                              "choose one that divides it (2)"),
    ((2, 1, 1), {**QWEN3, "model_type": "glm4", "architectures": ["Glm4ForCausalLM"]}, "mlx",
     "`--tensor-parallel-size 2`: mlx-lm's `mlx_lm.models.glm4` model has no `shard`"),
    ((1, 1, 2), {**QWEN3, "model_type": "qwen3_moe", "num_experts": 8}, "mlx",
     "`--data-parallel-size 2` with a mixture-of-experts model: vLLM runs such replicas in lockstep"),
])
def test_refusals_name_the_flag_and_the_reason(sizes, config, kv_path, words):
    tp, pp, dp = sizes
    args = ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp), "--data-parallel-size", str(dp)]
    assert parallel.refused_args(args, config, kv_path).startswith(words)


@pytest.mark.parametrize("sizes, config", [
    ((2, 1, 1), QWEN3),
    ((2, 1, 1), {"model_type": "mistral", "num_attention_heads": 8, "num_key_value_heads": 4}),  # mlx-lm's llama
    ((2, 1, 1), {"model_type": "qwen3_moe", "num_key_value_heads": 4, "num_experts": 8}),
    ((1, 1, 2), QWEN3),  # dense replicas are independent engines
    ((1, 1, 1), {"model_type": "glm4", "num_key_value_heads": 2}),
    ((1, 2, 1), QWEN3),
    ((1, 4, 1), {"model_type": "mistral", "num_attention_heads": 8, "num_key_value_heads": 4}),
    ((1, 2, 1), {"model_type": "qwen3_moe", "num_key_value_heads": 4, "num_experts": 8}),
])
def test_what_is_served(sizes, config):
    tp, pp, dp = sizes
    assert parallel.refusal(tp, pp, dp, kv_heads=parallel.kv_heads_of(config), moe=parallel.is_moe(config),
                            kv_path="mlx", unsplittable=parallel.unsplittable_module(config) if tp > 1 else None,
                            unstaged=parallel.unstaged_module(config) if pp > 1 else None) is None


def test_config_facts_from_text_config_too():
    wrapped = {"model_type": "llava", "text_config": {"num_attention_heads": 8, "num_key_value_heads": 2,
                                                      "num_local_experts": 4}}
    assert parallel.kv_heads_of(wrapped) == 2 and parallel.is_moe(wrapped)
    assert parallel.kv_heads_of({"num_attention_heads": 6}) == 6 and not parallel.is_moe({"num_experts": 0})


def test_ranks_on_one_machine_share_its_memory():
    assert parallel.ranks_sharing_memory(1, 1) == 1
    assert parallel.ranks_sharing_memory(2, 1) == 2
    assert parallel.ranks_sharing_memory(2, 3) == 6
    assert parallel.ranks_sharing_memory(1, 0) == 1  # a headless node with no local replica


# ------------------------------------------------------------------------------------------ vmetal serve


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(self):
        raise AssertionError(f"a server was started with {self.argv}")

    monkeypatch.setattr(ServerProcess, "start", refuse)


@pytest.mark.parametrize("vllm_args, words", [
    (["--tensor-parallel-size", "4"], "`--tensor-parallel-size 4`: the model's 2 KV heads cannot be split"),
    (["-pp", "2", "-tp", "2"], "`--pipeline-parallel-size 2` with --tensor-parallel-size"),
])
def test_serve_refuses_before_starting_anything(qwen3_model, nothing_starts, vllm_args, words):
    r = CliRunner().invoke(app, ["serve", str(qwen3_model), "--port", str(free_port()), "--", *vllm_args])
    assert r.exit_code == 2, r.output
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: " + words), line


def test_a_parallel_serve_that_ends_says_which_rank():
    from vmetal.cli.serve import _cause

    died = ["(EngineCore pid=9) ERROR 12-04 23:11:59 [multiproc_executor.py:315] Worker proc VllmWorker-1 died "
            "unexpectedly (exit code: None), shutting down executor."]
    assert _cause(died) == ": rank 1's worker process died"
    lost = ["(EngineCore pid=9) ERROR [core.py:1512] RuntimeError: Worker failed with error 'vmetal: "
            "tensor-parallel rank 0 lost MLX's ring ([ring] connection to a peer was lost); …'"]
    assert _cause(lost) == ": tensor-parallel rank 0 lost MLX's ring: another rank or its node stopped"
    assert _cause([lost[0].replace("tensor-parallel", "pipeline")]) == \
        ": pipeline rank 0 lost MLX's ring: another rank or its node stopped"
    assert _cause(["(APIServer pid=1) ERROR something else"]) == ""


@pytest.mark.parametrize("split", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_serve_refuses_a_ring_port_that_is_taken(qwen3_model, nothing_starts, monkeypatch, split):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1] - 1  # local rank 1's port is the taken one
        monkeypatch.setenv("VLLM_METAL_RING_PORT", str(base))
        r = CliRunner().invoke(app, ["serve", str(qwen3_model), "--port", str(free_port()), "--",
                                     split, "2"])
    assert r.exit_code == 2, r.output
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert line == (f"error: VLLM_METAL_RING_PORT={base}: port {base + 1} (MLX's ring, local rank 1) on 127.0.0.1 "
                    "is already in use"), line
