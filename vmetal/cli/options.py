"""What the commands that start or reach a server share (serve, chat, bench): their options, declared once,
and how MODEL / `--demo` / the KV flags turn into a model folder and a validated config."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal import envs
from vmetal.cli.output import say, warn
from vmetal.errors import USAGE, VmetalError

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEMO_SERVED_NAME = "vmetal-demo"


class Device(str, enum.Enum):
    gpu = "gpu"
    cpu = "cpu"


HostOption = Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable "
                                              "from other machines.")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]


def ready_timeout_option(panel: str | None = None) -> Any:
    """The `--ready-timeout` option of every command that starts a server (serve, chat, bench)."""
    return Annotated[float, typer.Option(min=1, rich_help_panel=panel,
                                         help="Seconds to wait for the server to answer /health.")]


ReadyTimeoutOption = ready_timeout_option()
ModelArgument = Annotated[str | None, typer.Argument(
    show_default=False, metavar="MODEL",
    help=f"Local model folder or Hugging Face id. Default: {DEFAULT_MODEL}.")]

# flag -> variable of ENV.md it sets, for hints that name the flag the user actually typed.
FLAG_VARIABLES = {
    "--paged": envs.USE_PAGED_ATTENTION,
    "--memory-fraction": envs.MEMORY_FRACTION,
    "--prefix-cache": envs.PREFIX_CACHE,
    "--block-size": envs.BLOCK_SIZE,
    "--device": envs.MLX_DEVICE,
}


def load_flags_config(*, block_size: int | None, device: str | None, paged: bool = False,
                      memory_fraction: str | None = None, prefix_cache: bool = False) -> envs.MetalConfig:
    """The environment with the flags on top, validated as the engine will validate it."""
    flags = {
        envs.PREFIX_CACHE: "1" if prefix_cache else None,
        envs.USE_PAGED_ATTENTION: "1" if paged else None,
        envs.MEMORY_FRACTION: memory_fraction,
        envs.BLOCK_SIZE: None if block_size is None else str(block_size),
        envs.MLX_DEVICE: device,
    }
    try:
        cfg = envs.load_config(os.environ, overrides=flags)
        envs.check_available(cfg)
        envs.check_kernels(cfg)
        if cfg.mlx_device == "gpu":
            # Only an explicit `gpu` is checked here: it must fail now rather than in the engine, and
            # probing MLX costs an import that `cpu` and unset do not need.
            envs.resolve_mlx_device(cfg)
    except envs.EnvError as exc:
        # Only flags that were given: a value from the environment is not the flag's doing.
        named = [f"`{flag}` sets {var}" for flag, var in FLAG_VARIABLES.items()
                 if flags[var] is not None and var in str(exc)]
        raise VmetalError(str(exc), hint="; ".join(named) or None, exit_code=USAGE) from None
    return cfg


def resolve_model(model: str | None, demo: bool) -> tuple[str | None, str]:
    """(what vLLM loads, or None for the demo model still to build; the name the user gave it)."""
    from vmetal.hub.common import looks_local

    if demo:
        if model is not None:
            raise VmetalError(f"give a MODEL or `--demo`, not both (MODEL was `{model}`)", exit_code=USAGE)
        return None, DEMO_SERVED_NAME
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.exists():
        # Absolute, so the server does not depend on its working directory.
        return str(path.resolve()), model
    if looks_local(model):
        raise VmetalError(f"model folder `{model}` does not exist",
                          hint=f"pass an existing folder, a Hugging Face id such as `{DEFAULT_MODEL}`, "
                               "or `--demo` for a tiny local model", exit_code=USAGE)
    return model, model


def demo_model() -> str:
    """The demo model's folder, built (and said so) the first time."""
    from vmetal.demo import default_demo_dir, ensure_demo_model

    if not (default_demo_dir() / "config.json").is_file():
        say(f"building the demo model in {default_demo_dir()}")
    return str(ensure_demo_model())


def pulled(model_id: str, max_model_len: int | None, kv_path: str | None = None) -> str:
    """A Hub model's local folder, pulled first with `vmetal pull`'s checks, progress and resumability (a
    verification only when it is complete), so that the engine loads from disk only. `kv_path`: the path it
    will be served on, so that a model it cannot hold is refused before the download."""
    from vmetal import hub
    from vmetal.cli.pull.view import TerminalView

    return str(hub.ensure_local(model_id, max_model_len=max_model_len, view=TerminalView(quiet=False),
                                kv_path=kv_path))


def check_parallel(vllm_args: list[str], config: dict[str, Any] | None, cfg: envs.MetalConfig) -> None:
    """Refuse parallel sizes the engine cannot serve for this model, or ring ports already taken (exit 2, one
    line), before vLLM starts."""
    from vmetal.preflight.parallel import nodes_in_args, refused_args, sizes_in_args
    from vmetal.server.process import PortInUseError, check_port_free

    refused = refused_args(vllm_args, config, cfg.kv_path)
    if refused:
        raise VmetalError(refused, exit_code=USAGE)
    sizes = sizes_in_args(vllm_args)
    ranks = sizes["tensor"] * sizes["pipeline"]  # both kinds of rank hold a ring port
    if cfg.ring_port is None or ranks == 1:
        return
    nodes = nodes_in_args(vllm_args)
    # Where the ranks will listen: loopback on one machine; across machines the address they advertise.
    host = "127.0.0.1" if nodes == 1 else os.environ.get("VLLM_HOST_IP")
    for local_rank in range(max(1, ranks // nodes)) if host else ():
        port = cfg.ring_port + local_rank
        try:
            check_port_free(host, port)
        except PortInUseError:
            raise VmetalError(f"{envs.RING_PORT}={cfg.ring_port}: port {port} (MLX's ring, local rank "
                              f"{local_rank}) on {host} is already in use",
                              hint=f"choose a free range or unset {envs.RING_PORT}", exit_code=USAGE) from None


def check_memory_fit(folder: str, max_model_len: int | None, vllm_args: list[str],
                     draft: str | None = None, held: tuple[int | None, ...] = ()) -> None:
    """Refuse a local model (with its speculative `draft` model, if any) that cannot fit in the memory MLX may
    use; warn when it fits only tightly."""
    from vmetal.preflight.fit import serving_fit

    report = serving_fit(folder, max_model_len, vllm_args, draft, held)
    if report is None:
        return
    if report.verdict == "tight":
        warn(f"model `{folder}` leaves little memory free: {report.describe()}; {report.advice()}")
    else:  # the weights' real size and, for an MLX-quantized model, its bits and group size
        say(f"model `{folder}`: {report.describe()}")
