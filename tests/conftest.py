"""Shared fixtures: tiny random-weight models built on the spot, and user directories kept away from the real
home.

Every test module runs with HOME, VMETAL_HOME, HF_HOME, MODELSCOPE_CACHE and XDG_CACHE_HOME in a temporary
folder of its own (servers a module starts inherit them), and HF_HUB_OFFLINE=1 unless a test opts in to a
local hub (tests/support/hub_fixtures.py). After each test, anything new under the real home's vmetal,
Hugging Face or ModelScope caches (or at the top of the real home) fails that test, naming the paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The plugin activates only when asked on non-Apple hosts; every test process
# (and the engine processes vLLM spawns from it) should see it active.
os.environ.setdefault("VMETAL_ENABLE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches a real hub; local hubs turn this off for their tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.support.hub_fixtures", "tests.support.servers"]

REAL_HOME = Path.home()
# Where user state would land if a test escaped its temporary home.
WATCHED = [REAL_HOME / ".cache" / name for name in ("vmetal", "huggingface", "modelscope")]
USER_DIRS = {"HOME": "", "XDG_CACHE_HOME": ".cache", "VMETAL_HOME": ".cache/vmetal",
             "HF_HOME": ".cache/huggingface", "MODELSCOPE_CACHE": ".cache/modelscope"}


def _real_home_state() -> set[str]:
    seen = {p.name for p in REAL_HOME.iterdir()} if REAL_HOME.is_dir() else set()
    for root in WATCHED:
        if root.is_dir():
            seen |= {str(p) for p in root.rglob("*")}
    return seen


@pytest.fixture(scope="module", autouse=True)
def user_dirs(tmp_path_factory) -> Path:
    """This module's home; module-scoped so that the servers a module shares start inside it too."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in USER_DIRS.items():
            mp.setenv(var, str(home / sub))
        yield home


@pytest.fixture(autouse=True)
def _nothing_written_to_the_real_home(request):
    before = _real_home_state()
    yield
    new = sorted(_real_home_state() - before)
    if new:
        pytest.fail(f"{request.node.nodeid} wrote under the real home {REAL_HOME}: {', '.join(new[:5])}",
                    pytrace=False)


# What `vmetal -v` puts in `os.environ` for the servers it starts.
VERBOSE_VARIABLES = ("VLLM_LOGGING_LEVEL", "VLLM_METAL_DEBUG")


@pytest.fixture(autouse=True)
def _verbose_flag_ends_with_its_test():
    """`vmetal -v` run in-process (CliRunner) sets VLLM_LOGGING_LEVEL=DEBUG: otherwise every later test's vLLM
    logs at debug level. Only these: vLLM sets variables of its own in the process once, and keeps relying on
    them."""
    before = {name: os.environ.get(name) for name in VERBOSE_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _fresh_env_config():
    """`envs.get_config` caches the process's config; a test that changes the environment must not leave
    its config behind for the next one (or find the previous one's)."""
    from vmetal import envs

    envs.get_config.cache_clear()
    yield
    envs.get_config.cache_clear()


@pytest.fixture(scope="module")
def launch_thread_on():
    """The decode-ahead's launches on a thread of their own (VLLM_METAL_LAUNCH_THREAD=1; `auto` gives the MLX-managed
    path one on a GPU, none on this CPU) for a module's engines, so the tests run the path a GPU runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_METAL_LAUNCH_THREAD", "1")
        yield


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def qwen3_model(models_dir) -> Path:
    from vmetal.demo import build_tiny_model

    return build_tiny_model(models_dir / "qwen3", "qwen3", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def llama_model(models_dir) -> Path:
    from vmetal.demo import build_tiny_model

    return build_tiny_model(models_dir / "llama", "llama", hidden_size=64, num_layers=2, seed=1)


def pytest_configure(config) -> None:
    """Ctrl-C reaches the CLI processes the tests start, however the suite itself was started. A shell starts a
    background job (`pytest &`, a CI step run with `&`) with SIGINT ignored, and children inherit an ignored
    signal: `vmetal chat`, `vmetal pull` and `vmetal install` children then never see the Ctrl-C their tests
    send (three tests failed that way in a backgrounded run). A handler of our own is not inherited: children
    start with the default, as from a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The order this run used (pyproject's addopts shuffles by module); `-q` hides pytest's header line."""
    try:
        from random_order.config import Config
    except ImportError:  # the test extras are not installed: pytest's own order
        return
    order = Config(config)
    if order.is_enabled:
        terminalreporter.write_line(f"test order: --random-order-bucket={order.bucket_type} "
                                    f"--random-order-seed={order.seed} (pass both to run this order again)")
