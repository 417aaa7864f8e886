"""The environment contract (ENV.md): defaults, validation messages, provenance, and the serve round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmetal import envs
from vmetal.envs import EnvError, MetalConfig, load_config, resolve_mlx_device, to_environ

PAGED = {"VLLM_METAL_USE_PAGED_ATTENTION": "1"}


def test_defaults_match_the_table():
    cfg = load_config({})
    assert cfg == MetalConfig()
    assert cfg.memory_fraction == "auto"
    assert cfg.use_mlx is True
    assert cfg.mlx_device is None
    assert cfg.block_size == 16
    assert cfg.use_paged_attention is False
    assert cfg.debug is False
    assert cfg.use_modelscope is False
    assert cfg.modelscope_cache is None
    assert cfg.prefix_cache is False
    assert cfg.prefix_cache_fraction == 0.05
    assert cfg.sources == {name: "default" for name, _, _ in envs.VARIABLES}
    assert cfg.raw == {}


def test_variables_table_lists_all_fifteen_in_doc_order():
    assert [v.name for v in envs.VARIABLES] == [
        "VLLM_METAL_MEMORY_FRACTION", "VLLM_METAL_USE_MLX", "VLLM_MLX_DEVICE", "VLLM_METAL_BLOCK_SIZE",
        "VLLM_METAL_USE_PAGED_ATTENTION", "VLLM_METAL_DEBUG", "VLLM_USE_MODELSCOPE",
        "VLLM_METAL_MODELSCOPE_CACHE", "VLLM_METAL_PREFIX_CACHE", "VLLM_METAL_PREFIX_CACHE_FRACTION",
        "VLLM_METAL_KERNELS", "VLLM_METAL_RING_PORT", "VLLM_METAL_COMPILE",
        "VLLM_METAL_PACKED_PROJECTIONS", "VLLM_METAL_LAUNCH_THREAD",
    ]
    defaults = {v.name: v.default for v in envs.VARIABLES}
    assert defaults["VLLM_METAL_MEMORY_FRACTION"] == "auto"
    assert defaults["VLLM_USE_MODELSCOPE"] == "False"
    assert defaults["VLLM_METAL_MODELSCOPE_CACHE"] is None
    assert all(v.meaning and "\n" not in v.meaning for v in envs.VARIABLES)


# --- the validity table ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fraction", "paged", "expected", "kv"),
    [("auto", "0", "auto", 0.9), ("auto", "1", "auto", 0.9), ("0.7", "1", 0.7, 0.7)],
)
def test_valid_combinations(fraction, paged, expected, kv):
    cfg = load_config({"VLLM_METAL_MEMORY_FRACTION": fraction, "VLLM_METAL_USE_PAGED_ATTENTION": paged})
    assert cfg.memory_fraction == expected
    assert cfg.use_paged_attention is (paged == "1")
    assert cfg.kv_fraction == kv


def test_explicit_fraction_without_paged_attention_is_invalid():
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_USE_PAGED_ATTENTION": "0"})
    assert str(exc.value) == (
        "VLLM_METAL_MEMORY_FRACTION=0.7 requires VLLM_METAL_USE_PAGED_ATTENTION=1 (the MLX-managed path "
        "sizes its own cache); set VLLM_METAL_MEMORY_FRACTION=auto"
    )
    assert exc.value.variable == "VLLM_METAL_MEMORY_FRACTION"
    assert exc.value.value == "0.7"


def test_explicit_fraction_with_paged_attention_unset_is_invalid():
    with pytest.raises(EnvError, match="requires VLLM_METAL_USE_PAGED_ATTENTION=1"):
        load_config({"VLLM_METAL_MEMORY_FRACTION": "0.5"})


def test_auto_is_case_insensitive():
    assert load_config({"VLLM_METAL_MEMORY_FRACTION": "AUTO"}).memory_fraction == "auto"


def test_fraction_of_exactly_one_is_allowed():
    assert load_config({"VLLM_METAL_MEMORY_FRACTION": "1", **PAGED}).kv_fraction == 1.0


# --- malformed values --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "abc", "nan", "inf"])
def test_bad_memory_fraction(value):
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_MEMORY_FRACTION": value, **PAGED})
    assert str(exc.value) == f"VLLM_METAL_MEMORY_FRACTION={value} is invalid: expected `auto` or a number in (0, 1]"
    assert exc.value.variable == "VLLM_METAL_MEMORY_FRACTION"
    assert exc.value.value == value


BOOLEANS = ["VLLM_METAL_USE_MLX", "VLLM_METAL_USE_PAGED_ATTENTION", "VLLM_METAL_DEBUG", "VLLM_USE_MODELSCOPE",
            "VLLM_METAL_PREFIX_CACHE"]
BOOL_FIELDS = {"VLLM_METAL_USE_MLX": "use_mlx", "VLLM_METAL_USE_PAGED_ATTENTION": "use_paged_attention",
               "VLLM_METAL_DEBUG": "debug", "VLLM_USE_MODELSCOPE": "use_modelscope",
               "VLLM_METAL_PREFIX_CACHE": "prefix_cache"}


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize("value", ["maybe", "2", "on", "y", "truee"])
def test_bad_boolean(name, value):
    with pytest.raises(EnvError) as exc:
        load_config({name: value})
    message = str(exc.value)
    assert message.startswith(f"{name}={value} is invalid: expected ")
    assert "1/0, true/false, yes/no" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", BOOLEANS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True),
     ("0", False), ("false", False), ("False", False), ("NO", False)],
)
def test_boolean_spellings(name, value, expected):
    assert getattr(load_config({name: value}), BOOL_FIELDS[name]) is expected


def test_prefix_cache_is_set_to_enable():
    assert load_config({}).prefix_cache is False
    assert load_config({"VLLM_METAL_PREFIX_CACHE": "1"}).prefix_cache is True


@pytest.mark.parametrize("value", ["12", "64", "0", "x", "-16", "16.0", "4"])
def test_bad_block_size(value):
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_BLOCK_SIZE": value})
    assert str(exc.value).startswith(f"VLLM_METAL_BLOCK_SIZE={value} is invalid: expected one of 8, 16, 32")


@pytest.mark.parametrize("value", [8, 16, 32])
def test_supported_block_sizes(value):
    assert load_config({"VLLM_METAL_BLOCK_SIZE": str(value)}).block_size == value


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "abc"])
def test_bad_prefix_cache_fraction(value):
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_PREFIX_CACHE_FRACTION": value})
    assert str(exc.value) == f"VLLM_METAL_PREFIX_CACHE_FRACTION={value} is invalid: expected a number in (0, 1]"


def test_prefix_cache_fraction_parses():
    assert load_config({"VLLM_METAL_PREFIX_CACHE_FRACTION": "0.25"}).prefix_cache_fraction == 0.25


@pytest.mark.parametrize("value", ["models/qwen", "./cache", "~/modelscope"])
def test_relative_modelscope_cache(value):
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_MODELSCOPE_CACHE": value})
    assert str(exc.value) == f"VLLM_METAL_MODELSCOPE_CACHE={value} is invalid: expected an absolute path"


def test_absolute_modelscope_cache(tmp_path):
    assert load_config({"VLLM_METAL_MODELSCOPE_CACHE": str(tmp_path)}).modelscope_cache == str(tmp_path)


@pytest.mark.parametrize("value", ["tpu", "mps", "cuda", "metal"])
def test_bad_device(value):
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_MLX_DEVICE": value})
    assert str(exc.value) == f"VLLM_MLX_DEVICE={value} is invalid: expected `gpu` or `cpu`"


def test_device_is_normalised():
    assert load_config({"VLLM_MLX_DEVICE": "GPU"}).mlx_device == "gpu"
    assert load_config({"VLLM_MLX_DEVICE": "cpu"}).mlx_device == "cpu"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_counts_as_unset(value):
    cfg = load_config({name: value for name, _, _ in envs.VARIABLES})
    assert cfg == MetalConfig()
    assert set(cfg.sources.values()) == {"default"}


def test_value_with_spaces_is_quoted_to_stay_readable():
    with pytest.raises(EnvError) as exc:
        load_config({"VLLM_METAL_DEBUG": "not sure"})
    assert str(exc.value).startswith("VLLM_METAL_DEBUG='not sure' is invalid")


def test_first_error_in_table_order_wins():
    env = {"VLLM_METAL_PREFIX_CACHE_FRACTION": "9", "VLLM_METAL_BLOCK_SIZE": "12", "VLLM_METAL_DEBUG": "maybe"}
    with pytest.raises(EnvError, match="VLLM_METAL_BLOCK_SIZE=12"):
        load_config(env)


def test_single_errors_come_before_the_combination_check():
    with pytest.raises(EnvError, match="VLLM_METAL_DEBUG=maybe"):
        load_config({"VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_DEBUG": "maybe"})


def test_env_error_is_a_value_error():
    assert issubclass(EnvError, ValueError)


# --- flags and sources -------------------------------------------------------------------------------

def test_flags_override_environment():
    env = {"VLLM_METAL_BLOCK_SIZE": "8", "VLLM_METAL_DEBUG": "1", "VLLM_METAL_USE_PAGED_ATTENTION": "0"}
    flags = {"VLLM_METAL_BLOCK_SIZE": "32", "VLLM_METAL_USE_PAGED_ATTENTION": "1",
             "VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_PREFIX_CACHE": "1"}
    cfg = load_config(env, flags)
    assert cfg.block_size == 32
    assert cfg.use_paged_attention is True
    assert cfg.memory_fraction == 0.7
    assert cfg.prefix_cache is True
    assert cfg.debug is True
    assert cfg.sources["VLLM_METAL_BLOCK_SIZE"] == "flag"
    assert cfg.sources["VLLM_METAL_USE_PAGED_ATTENTION"] == "flag"
    assert cfg.sources["VLLM_METAL_MEMORY_FRACTION"] == "flag"
    assert cfg.sources["VLLM_METAL_PREFIX_CACHE"] == "flag"
    assert cfg.sources["VLLM_METAL_DEBUG"] == "environment"
    assert cfg.sources["VLLM_METAL_USE_MLX"] == "default"
    assert cfg.raw == {"VLLM_METAL_BLOCK_SIZE": "32", "VLLM_METAL_USE_PAGED_ATTENTION": "1",
                       "VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_PREFIX_CACHE": "1",
                       "VLLM_METAL_DEBUG": "1"}


def test_flag_can_fix_an_invalid_combination_from_the_environment():
    env = {"VLLM_METAL_MEMORY_FRACTION": "0.7"}
    with pytest.raises(EnvError):
        load_config(env)
    assert load_config(env, {"VLLM_METAL_USE_PAGED_ATTENTION": "1"}).kv_fraction == 0.7


def test_bad_flag_value_names_the_variable():
    with pytest.raises(EnvError, match=r"^VLLM_METAL_BLOCK_SIZE=64 is invalid"):
        load_config({}, {"VLLM_METAL_BLOCK_SIZE": "64"})


def test_typed_flag_values_are_accepted():
    cfg = load_config({}, {"VLLM_METAL_USE_PAGED_ATTENTION": True, "VLLM_METAL_BLOCK_SIZE": 32})
    assert cfg.use_paged_attention is True and cfg.block_size == 32


def test_empty_flag_falls_back_to_environment():
    cfg = load_config({"VLLM_METAL_BLOCK_SIZE": "8"}, {"VLLM_METAL_BLOCK_SIZE": ""})
    assert cfg.block_size == 8
    assert cfg.sources["VLLM_METAL_BLOCK_SIZE"] == "environment"


def test_unknown_override_is_a_caller_bug():
    with pytest.raises(ValueError, match="VLLM_METAL_BLOK_SIZE") as exc:
        load_config({}, {"VLLM_METAL_BLOK_SIZE": "16"})
    assert not isinstance(exc.value, EnvError)


def test_unrelated_environment_is_ignored():
    assert load_config({"PATH": "/usr/bin", "VLLM_TARGET_DEVICE": "cpu"}) == MetalConfig()


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        load_config({}).block_size = 8  # type: ignore[misc]


# --- to_environ round trip ---------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    {},
    {"VLLM_METAL_MEMORY_FRACTION": "0.7", "VLLM_METAL_USE_PAGED_ATTENTION": "yes", "VLLM_METAL_BLOCK_SIZE": "32",
     "VLLM_METAL_PREFIX_CACHE": "TRUE", "VLLM_METAL_PREFIX_CACHE_FRACTION": "0.1", "VLLM_MLX_DEVICE": "cpu",
     "VLLM_METAL_DEBUG": "true", "VLLM_METAL_USE_MLX": "no", "VLLM_USE_MODELSCOPE": "yes",
     "VLLM_METAL_MODELSCOPE_CACHE": "/models/ms"},
    {"VLLM_METAL_MEMORY_FRACTION": "0.3333333333333333", "VLLM_METAL_USE_PAGED_ATTENTION": "1"},
    {"VLLM_METAL_MEMORY_FRACTION": "auto", "VLLM_METAL_USE_PAGED_ATTENTION": "1", "VLLM_MLX_DEVICE": "gpu"},
]


@pytest.mark.parametrize("env", ROUND_TRIP_CASES)
def test_to_environ_round_trip(env):
    cfg = load_config(env)
    exported = to_environ(cfg)
    assert set(exported) == {name for name, _, _ in envs.VARIABLES}
    assert all(isinstance(v, str) for v in exported.values())
    again = load_config(exported)
    assert again == cfg
    assert again.kv_fraction == cfg.kv_fraction
    assert {again.sources[n] for n in env} <= {"environment"}


def test_to_environ_blanks_unset_values_so_stale_ones_cannot_leak():
    exported = to_environ(load_config({}))
    assert exported["VLLM_MLX_DEVICE"] == ""
    assert exported["VLLM_METAL_MODELSCOPE_CACHE"] == ""
    stale = {"VLLM_MLX_DEVICE": "cpu", "VLLM_METAL_MODELSCOPE_CACHE": "/old"}
    assert load_config({**stale, **exported}) == MetalConfig()


def test_to_environ_speaks_vllms_modelscope_dialect():
    # vLLM parses VLLM_USE_MODELSCOPE itself and only understands 1/true.
    exported = to_environ(load_config({"VLLM_USE_MODELSCOPE": "yes"}))
    assert exported["VLLM_USE_MODELSCOPE"] == "True"


def test_describe_lists_effective_values_and_sources():
    rows = envs.describe(load_config({"VLLM_METAL_DEBUG": "yes"}, {"VLLM_METAL_BLOCK_SIZE": "8"}))
    assert [r[0] for r in rows] == [v.name for v in envs.VARIABLES]
    by_name = {name: (value, source) for name, value, source in rows}
    assert by_name["VLLM_METAL_DEBUG"] == ("1", "environment")
    assert by_name["VLLM_METAL_BLOCK_SIZE"] == ("8", "flag")
    assert by_name["VLLM_METAL_MODELSCOPE_CACHE"] == ("unset", "default")


# --- MLX device resolution ---------------------------------------------------------------------------

def _probe(result: bool):
    calls = []

    def gpu_available() -> bool:
        calls.append(1)
        return result

    return gpu_available, calls


def test_unset_device_with_gpu_resolves_to_gpu():
    probe, _ = _probe(True)
    assert resolve_mlx_device(load_config({}), probe) == ("gpu", None)


def test_unset_device_without_gpu_falls_back_to_cpu_with_one_info_line():
    probe, _ = _probe(False)
    device, info = resolve_mlx_device(load_config({}), probe)
    assert device == "cpu"
    assert info is not None and "VLLM_MLX_DEVICE" in info and "`cpu`" in info and "\n" not in info


def test_explicit_gpu_with_gpu():
    probe, _ = _probe(True)
    assert resolve_mlx_device(load_config({"VLLM_MLX_DEVICE": "gpu"}), probe) == ("gpu", None)


def test_explicit_gpu_without_gpu_fails_with_a_fix():
    probe, _ = _probe(False)
    with pytest.raises(EnvError) as exc:
        resolve_mlx_device(load_config({"VLLM_MLX_DEVICE": "gpu"}), probe)
    message = str(exc.value)
    assert message.startswith("VLLM_MLX_DEVICE=gpu ")
    assert "set VLLM_MLX_DEVICE=cpu" in message
    assert "Metal" in message and "mlx[cuda]" in message
    assert exc.value.variable == "VLLM_MLX_DEVICE"


@pytest.mark.parametrize("gpu", [True, False])
def test_explicit_cpu_never_probes(gpu):
    probe, calls = _probe(gpu)
    assert resolve_mlx_device(load_config({"VLLM_MLX_DEVICE": "cpu"}), probe) == ("cpu", None)
    assert calls == []


def test_default_probe_returns_a_bool():
    assert isinstance(envs._default_gpu_available(), bool)


# --- process-wide config and import cost -------------------------------------------------------------

def test_get_config_reads_os_environ_once(monkeypatch):
    envs.get_config.cache_clear()
    try:
        monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "8")
        first = envs.get_config()
        monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "32")
        assert envs.get_config() is first
        assert first.block_size == 8
        assert first.sources["VLLM_METAL_BLOCK_SIZE"] == "environment"
    finally:
        envs.get_config.cache_clear()


def test_import_pulls_in_nothing_heavy():
    code = ("import sys, vmetal.envs; "
            "print(sorted(m for m in ('mlx', 'torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the KV path and the Metal kernels ------------------------------------------------------------------


@pytest.mark.parametrize(("env", "path"), [
    ({}, "mlx"),
    ({"VLLM_METAL_USE_PAGED_ATTENTION": "1"}, "paged"),
    ({"VLLM_METAL_USE_MLX": "0"}, "torch"),
])
def test_kv_path_is_decided_once_from_the_config(env, path):
    assert load_config(env).kv_path == path


@pytest.mark.parametrize(("value", "kernels"), [("auto", None), ("AUTO", None), ("1", True), ("yes", True),
                                                ("0", False), ("false", False)])
def test_kernels_setting(value, kernels):
    cfg = load_config({"VLLM_METAL_KERNELS": value})
    assert cfg.kernels is kernels
    assert load_config(to_environ(cfg)).kernels is kernels  # survives the trip to a child process


def test_kernels_setting_rejects_other_values():
    with pytest.raises(EnvError, match=r"VLLM_METAL_KERNELS=maybe is invalid: expected `auto` or one of 1/0"):
        load_config({"VLLM_METAL_KERNELS": "maybe"})


def test_kernels_forced_where_metal_is_missing_is_an_error_and_probed_only_then():
    probes = []

    def no_metal() -> bool:
        probes.append(1)
        return False

    envs.check_kernels(load_config({}), no_metal)
    envs.check_kernels(load_config({"VLLM_METAL_KERNELS": "0"}), no_metal)
    assert probes == []
    with pytest.raises(EnvError, match="VLLM_METAL_KERNELS=1 asks for the Metal kernels, but MLX has no Metal"):
        envs.check_kernels(load_config({"VLLM_METAL_KERNELS": "1"}), no_metal)
    with pytest.raises(EnvError, match="VLLM_MLX_DEVICE=cpu"):
        envs.check_kernels(load_config({"VLLM_METAL_KERNELS": "1", "VLLM_MLX_DEVICE": "cpu"}), lambda: True)
    envs.check_kernels(load_config({"VLLM_METAL_KERNELS": "1"}), lambda: True)
