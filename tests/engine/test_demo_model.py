"""The tiny random-weight demo checkpoints load everywhere a hub model would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vmetal import demo

ARCHS = ["qwen3", "llama", "qwen2", "mistral"]
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-models")
    return {arch: demo.build_tiny_model(root / arch, arch, **TINY) for arch in ARCHS}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-tied")
    return {arch: demo.build_tiny_model(root / arch, arch, tie_word_embeddings=True, **TINY)
            for arch in ARCHS}


def _config(path):
    return json.loads((path / "config.json").read_text())


def _weight_names(path):
    import mlx.core as mx

    return set(mx.load(str(path / "model.safetensors")))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_fields(models, arch):
    from tokenizers import Tokenizer

    cfg = _config(models[arch])
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [demo.ARCHITECTURES[arch]]
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is False
    tok_size = Tokenizer.from_file(str(models[arch] / "tokenizer.json")).get_vocab_size()
    assert cfg["vocab_size"] >= tok_size and cfg["vocab_size"] % 64 == 0
    gen = json.loads((models[arch] / "generation_config.json").read_text())
    assert cfg["eos_token_id"] in gen["eos_token_id"]


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_names(models, tied, arch):
    names = _weight_names(models[arch])
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in _weight_names(tied[arch])
    assert not any("inv_freq" in n for n in names)
    biases = {n for n in names if n.endswith("_proj.bias")}
    if arch == "qwen2":
        assert biases == {f"model.layers.{i}.self_attn.{p}_proj.bias"
                          for i in range(2) for p in "qkv"}
    else:
        assert not biases
    assert any("q_norm" in n for n in names) == (arch == "qwen3")


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_same_model(models, tied, arch):
    """HF's own classes find every weight and compute the same logits as mlx-lm."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(models[arch]).model_type == arch
    for path in (models[arch], tied[arch]):
        hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info
        model, tokenizer = load(str(path))
        ids = tokenizer.encode("The cat reads a red book in the morning.")
        ref = hf(torch.tensor([ids])).logits[0].detach().numpy()
        got = np.array(model(mx.array(ids)[None])[0])
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_generates_varied_text(models, tied, arch):
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.generate import generate_step

    for path in (models[arch], tied[arch]):
        model, tokenizer = load(str(path))
        steps = generate_step(mx.array(tokenizer.encode("Hello world")), model, max_tokens=20)
        out = [int(token) for token, _ in steps]
        assert len(set(out)) >= 5, out  # greedy does not lock onto one token
        assert all(3 <= t < len(tokenizer._tokenizer) for t in out)  # no specials, no padding
        text = generate(model, tokenizer, "Hello world", max_tokens=20)
        assert text and "\ufffd" not in text and "Ġ" not in text


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer(models, arch):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[arch])
    for text in ["Hello world", "The cat reads 12345 apples\n\n  at 7:30 pm!"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == _config(models[arch])["eos_token_id"]
    # transformers 5 rebuilds a qwen2 tokenizer from vocab+merges with its own
    # pipeline; the demo one must tokenize the same through either path.
    raw = Tokenizer.from_file(str(models[arch] / "tokenizer.json"))
    sample = "Numbers 2024, words   and\nnew lines. <|im_start|>user"
    assert tok.encode(sample) == raw.encode(sample).ids

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Again"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(demo.IM_START_ID) == 5 and ids.count(demo.IM_END_ID) == 4
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not no_prompt.endswith("assistant\n")


def test_deterministic(tmp_path):
    a = demo.build_tiny_model(tmp_path / "a", "qwen2", **TINY)
    b = demo.build_tiny_model(tmp_path / "b", "qwen2", **TINY)
    c = demo.build_tiny_model(tmp_path / "c", "qwen2", seed=1, **TINY)
    for name in sorted(os.listdir(a)):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtypes(tmp_path, dtype):
    import mlx.core as mx
    from mlx_lm import generate, load

    path = demo.build_tiny_model(tmp_path, "llama", dtype=dtype, **TINY)
    assert {v.dtype for v in mx.load(str(path / "model.safetensors")).values()} == {getattr(mx, dtype)}
    assert _config(path)["torch_dtype"] == dtype
    model, tokenizer = load(str(path))
    assert generate(model, tokenizer, "Hello", max_tokens=5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        demo.build_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="vocab_size"):
        demo.build_tiny_model(tmp_path, vocab_size=100)


def test_explicit_vocab_size(tmp_path):
    from transformers import AutoTokenizer

    path = demo.build_tiny_model(tmp_path, "qwen3", vocab_size=1000, **TINY)
    assert _config(path)["vocab_size"] == 1000
    assert len(AutoTokenizer.from_pretrained(path)) <= 1000


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_explicit_head_dim(tmp_path, arch):
    """Qwen3-0.6B's head_dim (128) is not hidden // heads (64): the checkpoint has that shape and
    HF computes the same logits as mlx-lm."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    path = demo.build_tiny_model(tmp_path, arch, head_dim=32, tie_word_embeddings=True, **TINY)
    assert _config(path)["head_dim"] == 32
    weights = mx.load(str(path / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 64)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    model, tokenizer = load(str(path))
    ids = tokenizer.encode("The cat reads a red book in the morning.")
    ref = hf(torch.tensor([ids])).logits[0].detach().numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids)[None])[0]), ref, atol=1e-3, rtol=1e-3)


def test_head_dim_refused_where_mlx_lm_ignores_it(tmp_path):
    with pytest.raises(ValueError, match="qwen2 needs head_dim == hidden_size // num_heads"):
        demo.build_tiny_model(tmp_path, "qwen2", head_dim=32, **TINY)
    assert not (tmp_path / "model.safetensors").exists()


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VMETAL_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_demo_dir() == tmp_path / "xdg" / "vmetal" / "demo" / "qwen3-tiny"
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path / "vh"))
    assert demo.default_demo_dir() == tmp_path / "vh" / "demo" / "qwen3-tiny"


def test_ensure_demo_model_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("VMETAL_HOME", str(tmp_path))
    first = demo.ensure_demo_model()
    assert first == demo.default_demo_dir() and (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert os.listdir(first.parent) == [first.name]  # no temp dir left behind
    assert _config(first)["model_type"] == "qwen3"


def _run(code: str, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_import_is_cheap():
    res = _run("""
        import sys, vmetal.demo
        heavy = [m for m in ("mlx", "mlx_lm", "transformers", "tokenizers", "torch", "vllm")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_vllm_model_config(models):
    # A separate process: importing vllm resolves and caches its platform.
    res = _run(f"""
        from vllm.config import ModelConfig
        for arch, path in {({a: str(p) for a, p in models.items()})!r}.items():
            cfg = ModelConfig(model=path)
            assert cfg.architectures == [{demo.ARCHITECTURES!r}[arch]], cfg.architectures
            assert cfg.get_vocab_size() == 512 and cfg.get_head_size() == 16
            assert cfg.try_get_generation_config()["eos_token_id"] == [2, 0]
        print("ok")
    """, VLLM_TARGET_DEVICE="cpu", VMETAL_ENABLE="0")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
