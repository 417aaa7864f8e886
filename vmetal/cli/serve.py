"""`vmetal serve`: check everything that can be checked cheaply, then run vLLM's OpenAI server on MLX.

Every refusal (bad flag combination, missing model folder, busy port) happens before a process starts,
because vLLM itself takes ~10 s to reach the point where it would notice. The server runs as a child
(`vmetal.server.process.ServerProcess`); this module owns what a terminal user sees: the ready line, Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli import PASSTHROUGH, model_and_passthrough, options, speculation
from vmetal.cli.options import (
    Device,
    HostOption,
    ModelArgument,
    PortOption,
    ReadyTimeoutOption,
    check_memory_fit,
    check_parallel,
    load_flags_config,
    resolve_model,
)
from vmetal.cli.output import say, warn
from vmetal.errors import ERROR, USAGE, VmetalError
from vmetal.preflight import features
from vmetal.preflight.fit import vllm_switch
from vmetal.server.process import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    READY_TIMEOUT_S,
    ServerProcess,
    check_port_free,
    is_loopback,
    passthrough_api_keys,
)

COMMAND_SETTINGS: dict[str, Any] = {
    "context_settings": PASSTHROUGH,  # whatever follows `--` is for `vllm serve`
    "epilog": "Arguments after `--` go to `vllm serve` unchanged, e.g. "
              "`vmetal serve --demo -- --max-num-batched-tokens 512`.",
}

_KV = "KV cache and device (the VLLM_METAL_* variables)"
_VLLM = "vLLM"
_TOOLS = "Tools and reasoning"
# vLLM's server-wide defaults for the chat template (request-level chat_template_kwargs win over them).
NO_THINKING_ARGS = ["--default-chat-template-kwargs", '{"enable_thinking": false}']


def check_parser_flags(tool_call_parser: str | None, no_tool_parser: bool, reasoning_parser: str | None,
                       vllm_args: list[str]) -> None:
    """Refuse an unknown parser name or a contradiction before anything starts (exit 2)."""
    from vmetal.preflight.fit import vllm_arg
    from vmetal.server import parsers

    if tool_call_parser and no_tool_parser:
        raise VmetalError("give `--tool-call-parser` or `--no-tool-parser`, not both", exit_code=USAGE)
    # A plugin after `--` registers names only vLLM can see; it then judges ours too.
    checks = [("tool", tool_call_parser, "--tool-call-parser", "--tool-parser-plugin"),
              ("reasoning", reasoning_parser, "--reasoning-parser", "--reasoning-parser-plugin")]
    for kind, name, flag, plugin in checks:
        if name and vllm_arg(vllm_args, plugin) is None:
            try:
                parsers.check_name(kind, name, flag)
            except parsers.UnknownParserError as exc:
                raise VmetalError(str(exc), exit_code=USAGE) from None


def tool_and_reasoning_args(target: str | None, *, tool_call_parser: str | None, no_tool_parser: bool,
                            reasoning_parser: str | None, no_thinking: bool,
                            vllm_args: list[str]) -> tuple[list[str], str]:
    """The vLLM arguments for tool calls, reasoning and thinking, and one line saying which parser serves
    tool calls. They go before the user's own after `--`, which win (argparse keeps the last)."""
    from vmetal.preflight.fit import vllm_arg
    from vmetal.server import parsers

    args: list[str] = []
    given_after = vllm_arg(vllm_args, "--tool-call-parser")
    if given_after is not None:
        name, why = given_after, "given after `--`"
    elif no_tool_parser:
        name, why = None, "`--no-tool-parser`"
    elif tool_call_parser:
        name, why = tool_call_parser, "`--tool-call-parser`"
    else:
        choice = parsers.pick_tool_parser(target)
        name, why = choice.name, choice.reason
    if name is not None:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", name]
        line = (f"tool calls: `{name}` parser ({why}); "
                "change with --tool-call-parser NAME, switch off with --no-tool-parser")
    else:
        line = (f"tool calls: no parser ({why}); `tool_choice` auto is refused, named and required "
                "still work; pass --tool-call-parser NAME to enable it")
    if reasoning_parser:
        args += ["--reasoning-parser", reasoning_parser]
    if no_thinking:
        args += NO_THINKING_ARGS
    return args, line


def _exit_code(code: int) -> int:
    # A child killed by a signal reports -N; shells report that as 128+N.
    return 128 - code if code < 0 else code


# What ended a parallel serve, as vLLM's log says it (the worker that died) or vmetal's own (a rank that
# lost MLX's ring, when the dead rank was on another node).
_CAUSES = ((re.compile(r"Worker proc VllmWorker-(\d+) died unexpectedly"), "rank {0}'s worker process died"),
           (re.compile(r"vmetal: ((?:tensor-parallel|pipeline) rank \d+ lost MLX's ring)"),
            "{0}: another rank or its node stopped"))


def _cause(lines: list[str]) -> str:
    for pattern, words in _CAUSES:
        for line in lines:
            found = pattern.search(line)
            if found:
                return ": " + words.format(*found.groups())
    return ""


@contextlib.contextmanager
def _stop_on_signal(server: ServerProcess, what: str) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the event (a graceful stop); a second one kills `server`'s group. The handlers are
    restored and the server stopped on leaving."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stopping.is_set():
            server.kill()  # a second Ctrl-C: the user does not want to wait for a graceful stop
        else:
            say(f"stopping {what} (press Ctrl-C again to kill it)")
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def supervise(server: ServerProcess, name: str, shown_url: str, ready_timeout: float,
              on_ready: Callable[[], None] | None = None) -> int:
    """Run `server` until it exits or we get SIGINT/SIGTERM; the exit code for `vmetal serve`.
    `on_ready` runs once the server answers."""
    with _stop_on_signal(server, "the server") as stopping:
        server.start()
        if server.wait_ready(ready_timeout, cancel=stopping):
            say(f"serving {name} at {shown_url}")
            if on_ready is not None:
                on_ready()
            while not stopping.is_set():
                code = server.wait(0.25)
                if code is not None:
                    server.stop()  # whatever the child left behind in its group
                    # It stops only when asked: exiting on its own is a failure even with code 0, which is
                    # what vLLM's API server exits with when its EngineCore dies.
                    raise VmetalError(f"the vLLM server exited by itself with code {code} while serving"
                                      f"{_cause(server.errors)}",
                                      hint="its log above says why; `-v` adds the engine's debug logs",
                                      exit_code=_exit_code(code) or ERROR)
        server.stop()
        if server.killed:
            warn("the server did not stop in time and was killed")
        return 0


def supervise_headless(server: ServerProcess, name: str, vllm_args: list[str]) -> int:
    """Run a `--headless` node (its ranks or replicas join a head node's serve) until it exits or we get
    SIGINT/SIGTERM. There is no endpoint to wait for: vLLM's own log says when its workers are up."""
    from vmetal.preflight.fit import vllm_arg

    head = vllm_arg(vllm_args, "--master-addr") or vllm_arg(vllm_args, "--data-parallel-address") or "?"
    with _stop_on_signal(server, "this node") as stopping:
        server.start()
        say(f"headless node for {name}: its workers join the head node at {head}; stop it with Ctrl-C")
        while not stopping.is_set():
            code = server.wait(0.25)
            if code is not None:
                server.stop()
                if code == 0:
                    say("the headless node exited")
                    return 0
                raise VmetalError(f"the headless vLLM node exited with code {code}",
                                  hint=f"its log above says why (is the head node up, and reachable at {head}?)",
                                  exit_code=_exit_code(code) or ERROR)
        server.stop()
        return 0


def serve(
    ctx: typer.Context,
    model: ModelArgument = None,
    demo: Annotated[bool, typer.Option("--demo", help="Serve a tiny random-weight model built locally "
                                                      "(works offline).")] = False,
    host: HostOption = DEFAULT_HOST,
    port: PortOption = DEFAULT_PORT,
    api_key: Annotated[str | None, typer.Option(help="Require this key from clients (vLLM's `--api-key`; "
                                                     "VLLM_API_KEY works too).", show_default=False)] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model name clients send. Default: MODEL as given, `vmetal-demo` with --demo.",
        show_default=False, rich_help_panel=_VLLM)] = None,
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Longest prompt + output in tokens.",
                                                      show_default=False, rich_help_panel=_VLLM)] = None,
    max_num_seqs: Annotated[int | None, typer.Option(min=1, help="Most requests in one batch.",
                                                     show_default=False, rich_help_panel=_VLLM)] = None,
    paged: Annotated[bool, typer.Option("--paged", help="Use the paged KV cache managed by vLLM's block "
                                        "manager (prefix caching, chunked prefill).", rich_help_panel=_KV)] = False,
    memory_fraction: Annotated[str | None, typer.Option(
        metavar="auto|FRACTION", help="Device-memory fraction for the paged KV cache (needs --paged).",
        show_default=False, rich_help_panel=_KV)] = None,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache", help="Reuse the KV of shared prompt prefixes "
                                               "on the MLX-managed path (the paged path uses vLLM's own).",
                                               rich_help_panel=_KV)] = False,
    block_size: Annotated[int | None, typer.Option(help="KV cache block size in tokens: 8, 16 or 32.",
                                                   show_default=False, rich_help_panel=_KV)] = None,
    device: Annotated[Device | None, typer.Option(help="MLX device. Default: gpu where MLX has one.",
                                                  show_default=False, rich_help_panel=_KV)] = None,
    tool_call_parser: Annotated[str | None, typer.Option(
        metavar="NAME", help="vLLM tool-call parser for `tool_choice` auto (hermes, llama3_json, mistral, …). "
        "Default: picked from the model's chat template and family.", show_default=False,
        rich_help_panel=_TOOLS)] = None,
    no_tool_parser: Annotated[bool, typer.Option("--no-tool-parser", help="Run without a tool-call parser: "
                                                 "`tool_choice` auto is refused, named and required still "
                                                 "work.", rich_help_panel=_TOOLS)] = False,
    speculative: Annotated[str | None, typer.Option(
        metavar="ngram|DRAFT_MODEL", autocompletion=lambda: [features.NGRAM],
        help="Speculative decoding: drafts several tokens, checked in one step (greedy requests keep their exact "
        "tokens, sampled ones their distribution). `ngram` drafts the tokens that followed the context's last 4 "
        "where they appeared before (prompt lookup: code edits, quotes); a folder or Hub id drafts with that "
        "smaller model of the same family (pulled like MODEL). Same as vLLM's `--speculative-config`.",
        show_default=False, rich_help_panel=_VLLM)] = None,
    speculative_tokens: Annotated[int | None, typer.Option(
        min=1, max=16, help=f"Tokens drafted per step with --speculative. [default: {features.NGRAM_TOKENS} for "
        f"ngram, {features.DRAFT_TOKENS} for a draft model]", show_default=False, rich_help_panel=_VLLM)] = None,
    reasoning_parser: Annotated[str | None, typer.Option(
        metavar="NAME", help="vLLM reasoning parser (qwen3, deepseek_r1, …): the model's thinking goes to "
        "the reply's `reasoning` (a thinking block on /v1/messages), not its answer.", show_default=False, rich_help_panel=_TOOLS)] = None,
    no_thinking: Annotated[bool, typer.Option("--no-thinking", help="Thinking off by default "
                                              "(enable_thinking=false for the chat template); a request's "
                                              "own chat_template_kwargs win.", rich_help_panel=_TOOLS)] = False,
    no_pull: Annotated[bool, typer.Option("--no-pull", help="Do not pull a Hub model first; vLLM and mlx-lm "
                                          "then resolve it themselves.")] = False,
    ready_timeout: ReadyTimeoutOption = READY_TIMEOUT_S,
    detach: Annotated[bool, typer.Option("--detach", help="Run the server in the background: return once it "
                                         "answers, print its URL (stdout) and PID; its log goes under the vmetal "
                                         "home. `vmetal ps` lists it, `vmetal stop` stops it.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="With --detach: print the server as a JSON object "
                                              "on stdout.")] = False,
) -> None:
    """Serve MODEL through vLLM's OpenAI-compatible API, computed with MLX."""
    model, vllm_args = model_and_passthrough(model, ctx.args)
    if json_output and not detach:
        raise VmetalError("`--json` goes with `--detach`: a server in the foreground prints its log, not JSON",
                          exit_code=USAGE)
    passthrough = list(vllm_args)  # as given: a detached server adds its own arguments again

    cfg = load_flags_config(block_size=block_size, device=device.value if device else None, paged=paged,
                            memory_fraction=memory_fraction, prefix_cache=prefix_cache)
    check_parser_flags(tool_call_parser, no_tool_parser, reasoning_parser, vllm_args)
    vllm_args[:0] = speculation.speculation_args(speculative, speculative_tokens, vllm_args)
    refused = features.refused_args(vllm_args, cfg.kv_path)
    if refused:
        if speculative is not None:  # name the flag the user gave
            refused = refused.replace(f"`{features.SPECULATIVE}`", f"`--speculative {speculative}`")
        raise VmetalError(refused, exit_code=USAGE)
    check_parallel(vllm_args, None, cfg)
    target, given_name = resolve_model(model, demo)
    if api_key is not None and not api_key.strip():
        # `--api-key "$KEY"` with KEY unset would otherwise serve with no key at all, silently.
        raise VmetalError("`--api-key` is empty, so the server would accept every client",
                          hint="pass the key itself, or leave `--api-key` out", exit_code=USAGE)
    headless = vllm_switch(vllm_args, "--headless")
    if headless and detach:
        raise VmetalError("`--detach` waits for the server to answer HTTP, and a `--headless` node serves none",
                          hint="run the node in the foreground, or under your own process supervisor",
                          exit_code=USAGE)
    if not headless:  # a headless node listens on no HTTP port
        check_port_free(host, port)
    if not is_loopback(host) and not (api_key or os.environ.get("VLLM_API_KEY") or passthrough_api_keys(vllm_args)):
        warn(f"`--host {host}` accepts connections from other machines and no `--api-key` is set: "
             "anyone who can reach this port can use the server")
    if "--trust-remote-code" in vllm_args:
        warn("`--trust-remote-code` is on: Python code shipped with the model's files may run in the server")
    if target is not None and not Path(target).is_dir() and not no_pull:
        target = options.pulled(target, max_model_len, cfg.kv_path)
    local = target is not None and Path(target).is_dir()
    held: tuple[int | None, ...] = ()
    if local:
        from vmetal.preflight.cache_types import check_model, check_prefix_cache, check_speculation
        from vmetal.preflight.checkpoint import read_config
        from vmetal.preflight.model_files import check_folder

        check_folder(target)  # a damaged file fails here in milliseconds, not in the engine
        # A model whose caches this KV path does not hold (sliding windows, SSM state, …): exit 2 with one line
        # naming the family, the cache type and the path that would serve it, not a traceback ~10 s later.
        state = check_model(read_config(Path(target)), str(Path(target) / "config.json"), cfg.kv_path)
        held = state.held
        if cfg.prefix_cache:
            check_prefix_cache(state)
        if features.asks_speculation(vllm_args):
            check_speculation(state, cfg.kv_path)
        check_parallel(vllm_args, read_config(Path(target)), cfg)
    if target is None:
        target = options.demo_model()
    draft = speculation.resolve_draft(vllm_args, max_model_len, no_pull)
    if draft is not None and Path(target).is_dir():
        speculation.check_draft(target, draft)
    if local:
        check_memory_fit(target, max_model_len, vllm_args, draft, held)
    if features.serves_embeddings(target if local else None, vllm_args):
        refused = features.embeddings_refusal(vllm_args, cfg.kv_path)  # those vLLM picks from the checkpoint
        if refused:
            raise VmetalError(refused, exit_code=USAGE)
        # vLLM opens `/v1/embeddings` (and no generation route) for it: tool and reasoning parsers do not apply.
        say("embeddings: `/v1/embeddings` (vLLM's pooling runner, for an embedding model)")
    else:
        api_args, tools_line = tool_and_reasoning_args(
            target, tool_call_parser=tool_call_parser, no_tool_parser=no_tool_parser,
            reasoning_parser=reasoning_parser, no_thinking=no_thinking, vllm_args=vllm_args)
        vllm_args[:0] = api_args
        say(tools_line)

    if max_model_len is not None:
        vllm_args[:0] = ["--max-model-len", str(max_model_len)]
    if max_num_seqs is not None:
        vllm_args[:0] = ["--max-num-seqs", str(max_num_seqs)]
    name = served_model_name or given_name
    if detach:
        from vmetal.cli.servers import serve_detached

        serve_detached(ctx, target=target, name=name, vllm_args=passthrough, api_key=api_key,
                       json_output=json_output)
        raise typer.Exit(0)
    from vmetal.server.background import recorded

    # Recorded for `vmetal ps` / `vmetal stop` first, so that vLLM's processes inherit the record's id.
    with recorded(model=name, source=target, host=host, port=port, headless=headless) as entry:
        server = ServerProcess(target, host=host, port=port, served_model_name=name, api_key=api_key,
                               config=cfg, vllm_args=vllm_args)
        shown_host = f"[{host}]" if ":" in host else host
        code = (supervise_headless(server, name, vllm_args) if headless else
                supervise(server, name, f"http://{shown_host}:{port}/v1", ready_timeout, on_ready=entry.mark_served))
    raise typer.Exit(code)
