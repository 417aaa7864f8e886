"""`vmetal bench online|offline`: how fast a server serves, and how fast one stream runs.

`online` loads an OpenAI-compatible server with vLLM's own load generator (`vllm bench serve`), one run per
`--concurrency`, against the server at `--url` or one it starts for MODEL (`--demo`); `--compare mlx,paged`
starts one server per backend and adds ratio columns. `offline` runs single-stream trials through vLLM's `LLM`
in a child process: prefill and decode tok/s with their spread, and peak memory. The measuring lives in
`vmetal.bench`; this module owns the flags, the order of events, and what reaches the terminal.

Results are data (stdout: tables, or `--json`); progress and errors are messages (stderr). Whatever finished
before a failure is still printed and written (`--json`, `--csv`, `--plot`), then the error line, exit 1.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli import PASSTHROUGH, make_app, model_and_passthrough, options
from vmetal.cli.options import DEMO_SERVED_NAME, ModelArgument, check_memory_fit, ready_timeout_option, resolve_model
from vmetal.cli.output import exits_on_error, say
from vmetal.errors import USAGE, VmetalError
from vmetal.server.process import READY_TIMEOUT_S

app = make_app(help="Benchmark serving (online) and single-stream speed (offline).")

_EPILOG = ("Arguments after `--` go to vLLM's `vllm bench serve` load generator unchanged, e.g. "
           "`vmetal bench online --demo -- --temperature 0.7 --top-p 0.9`.")
COMMAND_SETTINGS: dict[str, Any] = {
    "context_settings": PASSTHROUGH,
    "epilog": _EPILOG,
}

_LOAD = "Load"
_OUT = "Output"
_SERVER = "Server started by bench (MODEL or --demo)"
ServerReadyTimeout = ready_timeout_option(_SERVER)

DemoOption = Annotated[bool, typer.Option("--demo", help="The tiny random-weight model `vmetal serve --demo` "
                                                         "serves (works offline).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the results as JSON (stdout) instead of "
                                                         "tables.", rich_help_panel=_OUT)]
CsvOption = Annotated[Path | None, typer.Option("--csv", metavar="FILE", show_default=False, dir_okay=False,
                                                help="Also write the results as CSV, one line per run.",
                                                rich_help_panel=_OUT)]
CompareOption = Annotated[str | None, typer.Option(
    metavar="BACKENDS", show_default=False,
    help="Run the same workload on each of these backends (mlx, paged, torch, ngram: the MLX path with "
         "`serve --speculative ngram`), comma-separated; ratios against the first.")]


def _home_logs() -> Path:
    from vmetal.envs import vmetal_home

    return vmetal_home() / "logs"


def _model_dir(model: str | None, demo: bool, max_model_len: int | None,
               serve_args: list[str]) -> tuple[str, str]:
    """(a local folder to load, the name to serve it as), pulling a Hub model first as `vmetal serve` does."""
    target, given_name = resolve_model(model, demo)
    if target is None:
        return options.demo_model(), given_name
    if not Path(target).is_dir():
        target = options.pulled(target, max_model_len)
    check_memory_fit(target, max_model_len, serve_args)
    return target, given_name


def _default_backend() -> str:
    from vmetal import envs

    return "paged" if envs.load_config(os.environ).use_paged_attention else "mlx"


def _finish(report: dict[str, Any], *, json_out: bool, csv_path: Path | None, plot: Path | None,
            printer: Any) -> None:
    """Show and write what was measured, then fail with the first error (partial results are already out)."""
    from vmetal.bench import report as rep

    if json_out:
        print(rep.to_json(report), flush=True)
    else:
        printer(report)
    if csv_path is not None:
        rep.write_csv(report, csv_path)
        say(f"wrote {csv_path}")
    if plot is not None and report["runs"]:
        rep.write_plot(report, plot)
        say(f"wrote {plot}")
    failures = [e for e in report["errors"] if not e.get("skipped")]
    if failures:
        first = failures[0]
        where = " ".join(x for x in (first.get("backend"), f"C={first['concurrency']}"
                                     if first.get("concurrency") else None) if x)
        kept = f" (the {len(report['runs'])} run(s) that finished are reported)" if report["runs"] else ""
        raise VmetalError(f"{where + ': ' if where else ''}{first['message']}{kept}",
                          hint=first.get("hint"), exit_code=first.get("exit_code", 1))


def online(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(
        show_default=False, metavar="MODEL",
        help="Local model folder or Hugging Face id to start a server for; with `--url`, which of that "
             "server's models to load (default: its first).")] = None,
    url: Annotated[str | None, typer.Option(show_default=False,
                                            help="A running server, e.g. http://127.0.0.1:8000/v1.")] = None,
    demo: DemoOption = False,
    api_key: Annotated[str | None, typer.Option(envvar="VLLM_API_KEY", show_default=False,
                                                help="Key the server wants.")] = None,
    concurrency: Annotated[str, typer.Option(metavar="C[,C…]", rich_help_panel=_LOAD,
                                             help="Most requests in flight; one run per value.")] = "1,8,32",
    request_rate: Annotated[str, typer.Option(metavar="inf|RPS", rich_help_panel=_LOAD,
                                              help="Requests sent per second (Poisson); `inf` sends all at "
                                                   "once.")] = "inf",
    num_prompts: Annotated[int | None, typer.Option(min=1, show_default=False, rich_help_panel=_LOAD,
                                                    help="Requests per run. Default: max(8, 4 x C).")] = None,
    input_len: Annotated[int, typer.Option(min=1, rich_help_panel=_LOAD,
                                           help="Prompt tokens of the random prompts (without --dataset).")]
        = 128,
    output_len: Annotated[int | None, typer.Option(min=1, show_default=False, rich_help_panel=_LOAD,
                                                   help="Tokens generated per request. Default: 128, or the "
                                                        "dataset's own lengths.")] = None,
    dataset: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, rich_help_panel=_LOAD,
                                                 help="Prompts: JSONL of {\"prompt\", \"output_tokens\"}, or "
                                                      "ShareGPT (.json list or .jsonl).")] = None,
    warmup: Annotated[int, typer.Option(min=0, rich_help_panel=_LOAD,
                                        help="Untimed requests before the first run of each server.")] = 2,
    compare: CompareOption = None,
    json_out: JsonOption = False,
    csv_path: CsvOption = None,
    plot: Annotated[Path | None, typer.Option(metavar="FILE.png", show_default=False, dir_okay=False,
                                              rich_help_panel=_OUT,
                                              help="Draw throughput and latency against concurrency "
                                                   "(needs matplotlib).")] = None,
    max_model_len: Annotated[int | None, typer.Option(min=1, show_default=False, rich_help_panel=_SERVER,
                                                      help="Its --max-model-len.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(min=1, show_default=False, rich_help_panel=_SERVER,
                                                     help="Its --max-num-seqs.")] = None,
    serve_args: Annotated[str | None, typer.Option(metavar="'ARGS'", show_default=False, rich_help_panel=_SERVER,
                                                   help="More `vllm serve` arguments, as one quoted "
                                                        "string.")] = None,
    ready_timeout: ServerReadyTimeout = READY_TIMEOUT_S,
) -> None:
    """Load a server with vLLM's benchmark client: throughput and TTFT/TPOT/ITL/E2E latency per concurrency."""
    import shlex

    from vmetal.bench import dataset as ds
    from vmetal.bench import online as on
    from vmetal.bench import report as rep

    model, vllm_args = model_and_passthrough(model, ctx.args)
    workload = on.Workload(concurrencies=on.parse_concurrency(concurrency),
                           request_rate=on.parse_request_rate(request_rate), num_prompts=num_prompts,
                           input_len=input_len, output_len=output_len, warmup=warmup, vllm_args=vllm_args)
    backends = on.parse_backends(compare) if compare else None
    if url and backends:
        raise VmetalError("`--compare` starts a server per backend; give MODEL or `--demo`, not `--url`",
                          exit_code=USAGE)
    if url is None and model is None and not demo:
        raise VmetalError("nothing to benchmark: give `--url` of a running server, or MODEL (or `--demo`) to "
                          "start one", hint="e.g. `vmetal bench online --demo` or `vmetal bench online --url "
                          "http://127.0.0.1:8000/v1`", exit_code=USAGE)
    if model is not None and demo:
        raise VmetalError(f"give a MODEL or `--demo`, not both (MODEL was `{model}`)", exit_code=USAGE)
    if plot is not None:
        rep.check_plot(plot)
    if csv_path is not None:
        rep.check_output(csv_path)
    on.check_vllm_args(workload)
    try:
        server_args = shlex.split(serve_args or "")
    except ValueError as exc:
        raise VmetalError(f"`--serve-args`: {exc}", exit_code=USAGE) from None
    if max_model_len is not None:
        server_args[:0] = ["--max-model-len", str(max_model_len)]
    if max_num_seqs is not None:
        server_args[:0] = ["--max-num-seqs", str(max_num_seqs)]

    with tempfile.TemporaryDirectory(prefix="vmetal-bench-") as tmp:
        if dataset is not None:
            workload.dataset = ds.load(dataset, tmp)
        results = on.Results()
        logs = _home_logs()
        logs.mkdir(parents=True, exist_ok=True)
        client_log = logs / "bench-client.log"
        on.quiet_vllm_client()
        report: dict[str, Any] = {"schema": rep.SCHEMA, "kind": "online", "model": model or DEMO_SERVED_NAME,
                                  "url": None, "backends": [], "workload": workload.describe()}
        with client_log.open("a", encoding="utf-8") as log:
            try:
                if url is not None:
                    target = on.target_at(url, DEMO_SERVED_NAME if demo else model, api_key)
                    report.update(url=target.base_url + "/v1", model=target.model_id, backends=["server"])
                    say(f"benchmarking {target.model_id} at {target.base_url}/v1 (vLLM's client log: "
                        f"{client_log})")
                    on.run_levels(target, workload, results, log, say)
                else:
                    backends = backends or [_default_backend()]
                    model_dir, name = _model_dir(model, demo, max_model_len, server_args)
                    server_args = on.sized_server_args(model_dir, server_args, workload)
                    report.update(model=name, backends=backends, server_args=server_args)
                    on.run_backends(backends, model_dir, name, workload, results, log, say, api_key=api_key,
                                    server_args=server_args, ready_timeout=ready_timeout, log_dir=logs)
            except KeyboardInterrupt:  # servers are stopped by now; show what finished
                results.fail(None, None, "interrupted", exit_code=130)
        report.update(runs=results.runs, errors=results.errors,
                      ratios=on.ratios(results, report["backends"][0]) if len(report["backends"]) > 1 else [])
        report["complete"] = not any(not e.get("skipped") for e in results.errors)
        _finish(report, json_out=json_out, csv_path=csv_path, plot=plot, printer=rep.print_online)


def offline(
    model: ModelArgument = None,
    demo: DemoOption = False,
    prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per trial (random ids).")] = 128,
    gen_len: Annotated[int, typer.Option(min=1, help="Tokens generated per trial.")] = 128,
    trials: Annotated[int, typer.Option(min=1, help="Timed runs, after one warm-up.")] = 3,
    repeat: Annotated[int, typer.Option(min=1, help="Build each prompt from one random block repeated this "
                                                    "many times: text that repeats itself, where n-gram "
                                                    "speculation (`--compare mlx,ngram`) pays off.")] = 1,
    compare: CompareOption = None,
    json_out: JsonOption = False,
    csv_path: CsvOption = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds one backend may take, loading included.")]
        = 1800.0,
) -> None:
    """Single-stream prefill and decode tok/s and peak memory (vLLM's LLM with the plugin), several trials."""
    from vmetal.bench import offline as off
    from vmetal.bench import online as on
    from vmetal.bench import report as rep

    backends = on.parse_backends(compare) if compare else [_default_backend()]
    if csv_path is not None:
        rep.check_output(csv_path)
    model_dir, name = _model_dir(model, demo, prompt_len + gen_len + 1, [])
    report: dict[str, Any] = {"schema": rep.SCHEMA, "kind": "offline", "model": name, "url": None,
                              "backends": backends, "workload": {"prompt_len": prompt_len, "gen_len": gen_len,
                                                                 "trials": trials, "repeat": repeat}}
    results = on.Results()
    try:
        off.run_backends(backends, model_dir, results, prompt_len=prompt_len, gen_len=gen_len, trials=trials,
                         timeout=timeout, log_dir=_home_logs(), say=say, repeat=repeat)
    except KeyboardInterrupt:  # the child is stopped by now; show the backends that finished
        results.fail(None, None, "interrupted", exit_code=130)
    report.update(runs=results.runs, errors=results.errors, ratios=off.ratios(results.runs, backends[0]))
    report["complete"] = not any(not e.get("skipped") for e in results.errors)
    _finish(report, json_out=json_out, csv_path=csv_path, plot=None, printer=rep.print_offline)


app.command("online", **COMMAND_SETTINGS)(exits_on_error(online))
app.command("offline")(exits_on_error(offline))
