"""Tiny random-weight models in Hugging Face layout, built locally.

Tests, `vmetal serve --demo`, `vmetal doctor --smoke` and the benchmarks need a
real checkpoint folder (config.json, model.safetensors, tokenizer files) that
loads through mlx-lm, transformers and vLLM like a hub download would, without
any network. Everything here is deterministic for a given seed, so two builds
of the same arguments are byte-identical.

mlx, tokenizers and transformers are imported inside the functions: the CLI
imports this module on every start.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Weight std is _GAIN / sqrt(fan_in). HF's usual 0.02 makes every logit near
# zero, and greedy output then sticks to one token; with this gain activations
# stay O(1), logits spread a few units, and greedy text keeps changing.
_GAIN = 4.0
# Qwen-style: <|endoftext|> ends documents (completion), <|im_end|> ends a chat
# turn. The tokenizer's eos is <|im_end|> so chat stops where a chat model would;
# generation_config lists both so plain completion stops too.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2

# Qwen3's chat format, trimmed: tools listed in the system turn, calls as <tool_call> JSON, results in a
# user turn as <tool_response>, and `enable_thinking=False` closing an empty <think> block after the
# generation prompt. A demo served with vLLM's hermes tool parser and qwen3 reasoning parser then
# behaves as a Qwen3 checkpoint does; messages without tools render exactly as plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] or '' %}"
    "{{ '<|im_start|>assistant\n' + content }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "{% if content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{ call['arguments'] if call['arguments'] is string else (call['arguments'] | tojson) }}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

DEMO_NAME = "qwen3-tiny"

_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _corpus() -> list[str]:
    # Enumerated rather than sampled: the stdlib `random` stream is not promised
    # to stay the same across Python versions, and the merges depend on it.
    subjects = ["The cat", "A small dog", "My friend", "The old teacher", "Our team",
                "The engineer", "A young girl", "The farmer", "Everyone", "The robot",
                "Hello world, she", "The model"]
    verbs = ["reads", "writes", "builds", "finds", "watches", "carries", "paints",
             "opens", "cleans", "remembers", "answers", "counts"]
    objects = ["a red book", "the long letter", "three apples", "an open window",
               "the blue door", "some fresh bread", "the quiet river", "a simple program",
               "the first question", "two green bottles", "the map of the city"]
    tails = ["in the morning.", "after lunch.", "near the station.", "every Sunday!",
             "with great care.", "before the rain starts.", "at 7:30 pm.",
             "because it is fun?", "while singing softly.", "on the 2nd of May."]
    out = []
    for i in range(400):
        # Mixed-radix indices, so subject, verb, object and ending vary independently.
        out.append(" ".join((subjects[i % 12], verbs[(i // 12 + 5 * i) % 12],
                             objects[(i // 3 + 2 * i) % 11], tails[(i // 7 + i) % 10])))
    out += ["Hello world", "Hello, world!", "What is the capital of France?",
            "The quick brown fox jumps over the lazy dog.", "1 2 3 4 5 6 7 8 9 10",
            "def main():\n    print('hi')\n", "Numbers: 0123456789 and symbols: #$%&*()[]{}"]
    return out


def build_tokenizer(path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE on the built-in corpus; write it for PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # The exact pipeline transformers 5's Qwen2Tokenizer builds: for model_type
    # qwen2 it ignores tokenizer_class and rebuilds the tokenizer from vocab and
    # merges, so any other pipeline would tokenize differently there than in
    # vLLM's or tokenizers' own view of tokenizer.json.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        # add_prefix_space=False keeps encode/decode an exact round trip.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Without the ByteLevel decoder, decoded text shows the byte-to-unicode stand-ins
    # (Ġ for a space, Ċ for a newline).
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte in the base vocab, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]
    tok.save(str(path / "tokenizer.json"))

    _write_json(path / "tokenizer_config.json", _tokenizer_config())
    _write_json(path / "special_tokens_map.json",
                {**_SPECIAL, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})


_SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def _tokenizer_config() -> dict:
    return {
        # The generic class loads tokenizer.json as is; naming e.g. Qwen2Tokenizer
        # would make transformers 5 rebuild the pipeline from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        **_SPECIAL,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(arch, *, hidden_size, num_layers, num_heads, num_kv_heads,
                 intermediate_size, vocab_size, max_position_embeddings, dtype,
                 tie_word_embeddings, head_dim=None) -> dict:
    """The config.json of a dense `arch` model (one of `ARCHITECTURES`) of this shape, with the demo tokenizer's
    token ids; `vmetal.bench.shapes` turns it into an MoE family's by adding that family's fields."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, not {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    if head_dim is not None and arch == "qwen2" and head_dim != hidden_size // num_heads:
        raise ValueError(f"qwen2 needs head_dim == hidden_size // num_heads ({hidden_size // num_heads})")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        # mlx-lm's qwen2 always uses hidden_size // num_heads, so that is the default; qwen3 and
        # llama read head_dim (Qwen3-0.6B: hidden 1024, 16 heads of 128).
        "head_dim": head_dim or hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        # Real-world values; they also keep llama and mistral (same mlx-lm code,
        # same seed) from being the same model twice.
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "vocab_size": vocab_size,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        # Both spellings: transformers 5 reads `dtype`, older tools `torch_dtype`.
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch in ("llama", "mistral"):
        config.update(attention_bias=False, mlp_bias=False)
    if arch == "qwen3":
        config["attention_bias"] = False
    if arch in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    if arch == "mistral":
        config["sliding_window"] = None
    return config


def _random_weights(config: dict, seed: int, emit: list[int]) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vmetal.preflight.cache_types import mlx_module

    # mlx-lm's own choice of module (it maps mistral onto llama, for one), so any family it implements works.
    module = importlib.import_module(f"mlx_lm.models.{mlx_module(config)}")
    model = module.Model(module.ModelArgs.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    # Sorted so each tensor's key does not depend on how mlx-lm orders its modules.
    for i, name in enumerate(sorted(params)):
        shape = params[name].shape
        k = keys[i]
        if name.endswith("norm.weight"):
            # Around 1, not exactly 1, so norms are not a no-op for kernel tests.
            w = 1.0 + 0.1 * mx.random.normal(shape, key=k)
        elif name.endswith("bias"):
            w = 0.5 * mx.random.normal(shape, key=k)
        elif "embed_tokens" in name:
            # Unit scale: tied, this is also the output matrix, and at this scale
            # the tied models' greedy text still varies (checked in the tests).
            w = mx.random.normal(shape, key=k)
        else:
            w = (_GAIN / shape[-1] ** 0.5) * mx.random.normal(shape, key=k)
        weights[name] = w
    # Only `emit` ids keep their output row; the rest get zeros, i.e. a zero logit
    # among logits spread several units wide, so they practically never win. That
    # keeps replies running to max_tokens (no chance <|im_end|>), never names a
    # padded id the tokenizer lacks, and never emits a lone byte of a UTF-8
    # sequence that would decode to U+FFFD.
    # The output matrix: `lm_head` where the model has one, else the (tied) embedding. Families name the
    # embedding differently (GPT-style `wte`), so it is found by shape: the [vocab, hidden] matrix.
    # A multimodal wrapper keeps both under its language model (`language_model.lm_head.weight`).
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    out = next((n for n in sorted(weights) if n.endswith("lm_head.weight")), None) or next(
        n for n in sorted(weights) if "emb" in n and weights[n].shape[0] == vocab)
    keep = mx.zeros((vocab, 1), dtype=mx.bool_)
    keep[mx.array(emit)] = True
    weights[out] = mx.where(keep, weights[out], 0.0)
    # sanitize drops what HF checkpoints do not carry (lm_head when tied); mlx-lm's loader calls it where
    # a family has one.
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    return weights


def build_tiny_model(path, arch: str = "qwen3", *, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     vocab_size: int | None = None, max_position_embeddings: int = 2048,
                     dtype: str = "float32", seed: int = 0,
                     tie_word_embeddings: bool = False, head_dim: int | None = None) -> Path:
    """Write a random-weight `arch` checkpoint plus tokenizer into `path`; return it."""
    config = model_config(
        arch, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, dtype=dtype,
        tie_word_embeddings=tie_word_embeddings, head_dim=head_dim)
    return build_checkpoint(path, config, seed=seed, dtype=dtype)


def build_checkpoint(path, config: dict, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a random-weight checkpoint of any family mlx-lm implements, plus the demo tokenizer, into `path`.

    `config` is the family's config.json (its `model_type` picks mlx-lm's model class, whose parameter names
    and `sanitize` the weights follow); a `vocab_size` of None is the tokenizer's, rounded up to 64. The
    token ids and dtype fields are the demo tokenizer's and `dtype`'s.
    """
    import mlx.core as mx
    from tokenizers import Tokenizer

    dtypes = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, not {dtype!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    used_vocab = tok.get_vocab_size()
    emit = [i for i in range(len(SPECIAL_TOKENS), used_vocab) if _plain_text(tok.decode([i]))]
    config = {**config, "bos_token_id": ENDOFTEXT_ID, "eos_token_id": IM_END_ID, "pad_token_id": ENDOFTEXT_ID,
              # Both spellings: transformers 5 reads `dtype`, older tools `torch_dtype`.
              "torch_dtype": dtype, "dtype": dtype}
    if config.get("vocab_size") is None:
        config["vocab_size"] = -(-used_vocab // 64) * 64
    if isinstance(config.get("text_config"), dict):  # a multimodal wrapper's language model reads its own
        config["text_config"] = {**config["text_config"], "vocab_size": config["vocab_size"]}
    if config["vocab_size"] < used_vocab:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {used_vocab}")
    weights = _random_weights(config, seed, emit)
    weights = {k: v.astype(dtypes[dtype]) for k, v in sorted(weights.items())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {
        "bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID})
    return path


def default_demo_dir() -> Path:
    """Where the demo model lives: under the vmetal home (`vmetal.envs.vmetal_home`)."""
    from vmetal.envs import vmetal_home

    return vmetal_home() / "demo" / DEMO_NAME


def ensure_demo_model() -> Path:
    """Build the demo model once; later calls (and other processes) reuse it."""
    target = default_demo_dir()
    if (target / "config.json").is_file():
        _refresh_tokenizer_config(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so a crash or a concurrent
    # build never leaves a half-written folder under the final name.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_model(tmp, "qwen3")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process won the race (os.replace will not replace a non-empty dir).
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _refresh_tokenizer_config(target: Path) -> None:
    """Bring a demo folder built by an older vmetal up to this one's chat template.

    The template only shapes prompts (the vocabulary and weights do not depend on it), so rewriting
    tokenizer_config.json makes the folder byte-identical to a fresh build without retraining anything.
    """
    current = target / "tokenizer_config.json"
    try:
        if json.loads(current.read_text()) == _tokenizer_config():
            return
    except (OSError, ValueError):
        pass
    # Renamed into place, so a concurrent reader sees the old file or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer_config-", dir=target)
    os.close(fd)
    _write_json(Path(tmp), _tokenizer_config())
    os.replace(tmp, current)


def _plain_text(s: str) -> bool:
    return bool(s) and all(c == "\n" or (c.isascii() and c.isprintable()) for c in s)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
