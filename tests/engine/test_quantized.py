"""MLX-quantized checkpoints (mlx-lm's `quantization` block in config.json) end to end.

The tiny random qwen3 model is quantized with mlx-lm's own converter to 4-bit (group size 32) and 8-bit
(group size 64). What a user sees: vLLM's config accepts the folders without taking them for a vLLM
quantization method, the memory reports count the packed bytes and name the bits, the engine (paged path
too) and a real OpenAI server answer greedy requests with exactly `mlx_lm.generate`'s tokens on the same
folder, and a vLLM `--quantization` that vmetal would silently ignore is refused.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.engine import mlx_greedy
from vmetal.server.process import free_port

MAX_MODEL_LEN = 256
PROMPTS = ["The quick brown fox", "Hello world", "The old teacher opens the blue door near the station",
           "one"]
# bits -> group size: both group sizes and both widths mlx-community ships most.
VARIANTS = {4: 32, 8: 64}


def quantize(src: Path, dst: Path, bits: int, group_size: int, mode: str = "affine") -> Path:
    from mlx_lm.convert import convert

    if not dst.exists():
        convert(str(src), mlx_path=str(dst), quantize=True, q_bits=bits, q_group_size=group_size, q_mode=mode)
    return dst


@pytest.fixture(scope="session")
def quantized(qwen3_model, models_dir) -> dict[int, Path]:
    return {bits: quantize(qwen3_model, models_dir / f"qwen3-{bits}bit", bits, group)
            for bits, group in VARIANTS.items()}


@pytest.fixture(scope="session")
def mxfp4_model(qwen3_model, models_dir) -> Path:
    return quantize(qwen3_model, models_dir / "qwen3-mxfp4", 4, 32, mode="mxfp4")


def weights_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------ config and memory


def test_quantization_block_is_read_as_mlx_writes_it(quantized, mxfp4_model):
    from vmetal.preflight.checkpoint import Quantization, quantization_of, read_config

    assert quantization_of(read_config(quantized[4])) == Quantization(bits=4, group_size=32, mode="affine")
    assert quantization_of(read_config(quantized[8])) == Quantization(bits=8, group_size=64, mode="affine")
    assert quantization_of(read_config(mxfp4_model)).describe() == "4-bit mxfp4, group size 32"
    # mlx-lm's mixed recipes name some layers with their own width; False keeps a layer unquantized.
    mixed = {"quantization": {"bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj":
                              {"bits": 6, "group_size": 64}, "lm_head": False}}
    assert quantization_of(mixed).describe() == "4-bit affine, group size 64 (some layers 6-bit)"
    # A torch method's quantization_config is not MLX's, nor is an unquantized config.
    assert quantization_of({"quantization_config": {"quant_method": "awq", "bits": 4}}) is None
    assert quantization_of({"hidden_size": 64}) is None


@pytest.mark.parametrize("block", [
    {"group_size": 32, "bits": 4, "mode": "affine"},
    {"group_size": 64, "bits": 8, "mode": "affine"},
    {"group_size": 128, "bits": 4},  # older mlx-lm wrote no mode
    {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    {"group_size": 64, "bits": 4, "mode": "affine", "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}},
])
def test_vllm_model_config_resolves_no_quantization_method(quantized, tmp_path, block):
    """vLLM probes every quantization method's override on `quantization_config`; none may claim MLX's."""
    from vllm.config import ModelConfig

    folder = tmp_path / "model"
    shutil.copytree(quantized[4], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = block
    (folder / "config.json").write_text(json.dumps(config))
    assert ModelConfig(model=str(folder)).quantization is None


def test_a_vllm_quantization_method_is_refused_not_ignored(qwen3_model):
    from vllm.config import ModelConfig

    with pytest.raises(ValueError, match=r"quantization method `fp8` .* vmetal does not run it: .*"
                                         r"`vmetal convert SRC DST --bits 4`"):
        ModelConfig(model=str(qwen3_model), quantization="fp8")


def test_fit_counts_the_packed_bytes_and_names_the_bits(quantized, qwen3_model):
    from vmetal.preflight import fit

    full = fit.estimate_folder(qwen3_model, memory_bytes=8 * fit.GiB)
    for bits, group in VARIANTS.items():
        report = fit.estimate_folder(quantized[bits], memory_bytes=8 * fit.GiB)
        assert report.weights_bytes == weights_on_disk(quantized[bits])
        # float32 source: 4-bit + group-32 scales and biases is ~5x smaller, 8-bit/64 ~3x.
        assert report.weights_bytes < full.weights_bytes / {4: 4.5, 8: 2.8}[bits]
        assert f"({bits}-bit affine, group size {group}) + KV" in report.describe()
        assert report.as_dict()["quantization"] == {"bits": bits, "group_size": group, "mode": "affine",
                                                     "other_bits": []}
        # KV is in the activations' dtype (float32 here), the same as the unquantized model's.
        assert report.kv_bytes_per_token == full.kv_bytes_per_token
    assert full.as_dict()["quantization"] is None and "-bit" not in full.describe()


def test_loaded_model_keeps_weights_packed_and_sizes_kv_right(quantized):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    from vmetal.engine.models import load

    loaded = load(str(quantized[4]))
    # The weights stay packed: the loaded arrays are the checkpoint's bytes (within the safetensors header's
    # few kB), not dequantized floats (about 5x more). Counted from the arrays themselves: MLX's active-memory
    # delta also moves with whatever else this process allocated or freed meanwhile.
    held = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    assert 0.9 * weights_on_disk(quantized[4]) < held <= weights_on_disk(quantized[4])
    cache = make_prompt_cache(loaded.model)
    loaded.model(mx.array([[5, 6, 7]]), cache=cache)
    kv = cache[0].keys
    assert kv.dtype == loaded.dtype == mx.float32
    assert loaded.kv_bytes_per_token == 2 * loaded.num_layers * loaded.num_kv_heads * loaded.head_dim * 4
    assert loaded.quantization.describe() == "4-bit affine, group size 32"


# ------------------------------------------------------------------------------ what the CLI reports


def test_pull_of_a_local_folder_reports_bits_and_packed_size(quantized):
    from vmetal.cli.app import app

    result = CliRunner().invoke(app, ["pull", str(quantized[8]), "--json"])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["fit"]
    assert fit["weights_bytes"] == weights_on_disk(quantized[8])
    assert fit["quantization"] == {"bits": 8, "group_size": 64, "mode": "affine", "other_bits": []}


def test_doctor_model_fit_reports_bits_and_packed_size(quantized):
    from vmetal.cli.doctor.serving import check_model_fit

    check = check_model_fit(str(quantized[4]), None)
    assert "(4-bit affine, group size 32)" in check.summary
    assert check.details["weights_bytes"] == weights_on_disk(quantized[4])
    assert check.details["quantization"]["bits"] == 4


def test_serve_says_bits_and_weights_before_starting(quantized, monkeypatch):
    from vmetal.cli import serve as serve_cmd
    from vmetal.cli.app import app

    started = []

    class NoServer:
        def __init__(self, model, **kwargs):
            started.append(model)
            self.killed = False

        def start(self):
            pass

        def wait_ready(self, timeout, cancel=None):
            return False

        def stop(self, grace=15.0):
            return 0

    monkeypatch.setattr(serve_cmd, "ServerProcess", NoServer)
    result = CliRunner().invoke(app, ["serve", str(quantized[4]), "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith(f"vmetal: model `{quantized[4]}`"))
    assert "(4-bit affine, group size 32)" in line and line.endswith(": fits")
    assert started == [str(quantized[4])]


# ------------------------------------------------------------------------------ the engine, paged path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["4bit", "mxfp4"])
def test_paged_engine_matches_mlx_lm_on_quantized_weights(quantized, mxfp4_model, which, monkeypatch):
    from vllm import LLM, SamplingParams

    folder = quantized[4] if which == "4bit" else mxfp4_model
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2")
    llm = LLM(model=str(folder), max_model_len=MAX_MODEL_LEN, max_num_seqs=8, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(folder, out.prompt_token_ids, 12)
        (inspection,) = llm.collective_rpc("get_model_inspection")
        expected = "4-bit affine, group size 32" if which == "4bit" else "4-bit mxfp4, group size 32"
        assert expected in inspection, inspection
        # The worker's memory accounting (weights subtracted from the KV budget) is the packed size.
        reported = int(inspection.rsplit(", ", 1)[1].split()[0])
        assert 0.9 * weights_on_disk(folder) < reported <= weights_on_disk(folder), inspection
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("kv_path", ["mlx", "paged"])
def test_a_quantized_moe_serves_mlx_lms_tokens(models_dir, monkeypatch, kv_path):
    """mlx-community's MoE repos (Qwen3-30B-A3B-4bit and the like): experts quantized by mlx-lm's converter as
    one stacked SwitchLinear each, served on both KV paths with mlx-lm's tokens."""
    from vllm import SamplingParams

    from tests.support.engine import running_llm
    from tests.support.families import build_family

    source = models_dir / "family-qwen3_moe-q"
    if not source.exists():
        build_family(source, "qwen3_moe")
    folder = quantize(source, models_dir / "qwen3-moe-4bit", 4, 64)
    monkeypatch.setenv("VLLM_METAL_USE_PAGED_ATTENTION", "1" if kv_path == "paged" else "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.2" if kv_path == "paged" else "auto")
    with running_llm(folder, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, seed=0) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(folder, out.prompt_token_ids, 12, ignore_eos=True)
        (inspection,) = llm.collective_rpc("get_model_inspection")
        assert "qwen3_moe" in inspection and "4-bit affine, group size 64" in inspection, inspection


@pytest.mark.slow
def test_gpt_oss_as_openai_publishes_it_serves_mlx_lms_tokens(models_dir):
    """openai/gpt-oss-* ships its experts as mxfp4 `*_blocks`/`*_scales` under a `quant_method: mxfp4`
    quantization_config, which vLLM resolves to its own `gpt_oss_mxfp4` method. mlx-lm loads that layout as
    MLX's mxfp4, so vmetal lets it through (any other vLLM method stays refused) and serves mlx-lm's tokens;
    the memory report names the bits. (H 64, I 96: transposed gate/up/down blocks could not load.)"""
    from vllm import SamplingParams
    from vllm.config import ModelConfig

    from tests.support.engine import running_llm
    from tests.support.families import as_published_mxfp4, build_family
    from vmetal.preflight import fit

    folder = models_dir / "gpt-oss-published"
    if not folder.exists():
        as_published_mxfp4(build_family(models_dir / "gpt-oss-float96", "gpt_oss", intermediate_size=96), folder)
    assert ModelConfig(model=str(folder)).quantization == "gpt_oss_mxfp4"
    report = fit.estimate_folder(folder, max_model_len=MAX_MODEL_LEN, memory_bytes=8 * fit.GiB)
    assert "(4-bit mxfp4, group size 32) + KV" in report.describe(), report.describe()
    with running_llm(folder, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, seed=0) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
        for out in outs:
            assert list(out.outputs[0].token_ids) == mlx_greedy(folder, out.prompt_token_ids, 12)
        (inspection,) = llm.collective_rpc("get_model_inspection")
        assert "4-bit mxfp4, group size 32" in inspection, inspection


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def server(request, quantized, tmp_path_factory):
    from vmetal.server.process import ServerProcess

    folder = quantized[request.param]
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(str(folder), host="127.0.0.1", port=free_port(), served_model_name="tiny-q",
                         vllm_args=["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"],
                         echo=False, log_path=log)
    with proc:
        yield folder, proc
    assert not proc._group_alive()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server[1].url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def complete(client, prompt: str, max_tokens: int = 16) -> tuple[list[int], list[int], str, str]:
    """(prompt token ids, output token ids, text, finish reason) of one greedy completion."""
    res = client.completions.create(model="tiny-q", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = res.choices[0]
    return choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"], choice.text, \
        choice.finish_reason


@pytest.mark.slow
def test_server_greedy_matches_mlx_lm_one_at_a_time(server, client):
    from transformers import AutoTokenizer

    folder, _ = server
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for prompt in PROMPTS[:3]:
        prompt_ids, token_ids, text, finish = complete(client, prompt)
        assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = mlx_greedy(folder, prompt_ids, 16)
        assert len(expected) == 16 and token_ids == expected
        assert text == tokenizer.decode(expected) and finish == "length"


@pytest.mark.slow
def test_server_concurrent_requests_match_mlx_lm(server, client):
    folder, _ = server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: complete(client, p, 24), PROMPTS))
    for prompt_ids, token_ids, _, _ in results:
        assert token_ids == mlx_greedy(folder, prompt_ids, 24)


@pytest.mark.slow
def test_server_lists_the_model_and_says_it_loaded_quantized(server, client):
    folder, proc = server
    assert [m.id for m in client.models.list().data] == ["tiny-q"]
    bits = json.loads((folder / "config.json").read_text())["quantization"]["bits"]
    log = Path(proc.log_path).read_text()
    assert f"MLX-quantized checkpoint ({bits}-bit affine, group size {VARIANTS[bits]})" in log
    assert f"of weights, {bits}-bit affine, group size {VARIANTS[bits]})" in log
