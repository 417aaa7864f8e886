"""Online benchmark: vLLM's own load generator against an OpenAI-compatible server.

The load is `vllm bench serve`'s: `vllm.benchmarks.serve.main_async` with a Namespace parsed by vLLM's own
`add_cli_args` parser, so every `vllm bench serve` option (sampling, goodput, ramp-up, HF datasets, …) works
after `--` and means what vLLM's documentation says. vmetal only adds what vLLM's command does not do:

- a server of its own (`ServerProcess`), one per backend for `--compare mlx,paged,torch`;
- several concurrencies in one run (one `main_async` per level, warm-up requests before the first);
- datasets checked line by line first (`vmetal.bench.dataset`);
- one summary row per (backend, concurrency), kept when a later level or backend fails.

vLLM prints its own report to stdout; here that goes to the client log, and stdout carries only our table or
JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vmetal import envs
from vmetal.bench.compare import against
from vmetal.bench.dataset import CUSTOM, SHAREGPT, Dataset
from vmetal.errors import USAGE, VmetalError

BACKENDS = ("mlx", "paged", "torch", "ngram")
# Environment of each backend's server, on top of the user's VLLM_METAL_* settings.
BACKEND_ENV = {
    "mlx": {envs.USE_PAGED_ATTENTION: "0", envs.USE_MLX: "1"},
    "paged": {envs.USE_PAGED_ATTENTION: "1", envs.USE_MLX: "1"},
    "torch": {envs.USE_PAGED_ATTENTION: "0", envs.USE_MLX: "0"},
    "ngram": {envs.USE_PAGED_ATTENTION: "0", envs.USE_MLX: "1"},
}


def backend_speculation(backend: str) -> dict[str, Any] | None:
    """vLLM's speculative config of a backend: `ngram` is the MLX-managed path with `vmetal serve --speculative
    ngram`; the others speculate not at all."""
    from vmetal.preflight.features import ngram_config

    return ngram_config() if backend == "ngram" else None


def backend_vllm_args(backend: str) -> list[str]:
    """The vLLM arguments a backend's server adds."""
    from vmetal.preflight.features import SPECULATIVE

    spec = backend_speculation(backend)
    return [] if spec is None else [SPECULATIVE, json.dumps(spec)]
NOT_AVAILABLE = "not available in this build"

METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p90", "p99")
PERCENTILES = "90,99"  # besides vLLM's mean and median
# Options this module sets per run from its own flags; after `--` they would silently fight ours.
OWNED = {"--base-url": "--url", "--host": "--url", "--port": "--url", "--max-concurrency": "--concurrency",
         "--request-rate": "--request-rate", "--num-prompts": "--num-prompts", "--num-warmups": "--warmup",
         "--input-len": "--input-len", "--output-len": "--output-len", "--model": "MODEL",
         "--served-model-name": "MODEL"}
# What one run keeps of vLLM's result (besides the latency statistics).
RUN_KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s")


@dataclass
class Workload:
    """What every backend and concurrency level is given."""

    concurrencies: list[int]
    request_rate: float = math.inf
    num_prompts: int | None = None  # per level; None: max(8, 4 x C)
    input_len: int = 128
    output_len: int | None = None  # None: 128, or the dataset's own lengths
    dataset: Dataset | None = None
    warmup: int = 2
    seed: int = 0
    vllm_args: list[str] = field(default_factory=list)

    def prompts_for(self, concurrency: int) -> int:
        return self.num_prompts or max(8, 4 * concurrency)

    def describe(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrencies,
            "request_rate": "inf" if math.isinf(self.request_rate) else self.request_rate,
            "num_prompts": {str(c): self.prompts_for(c) for c in self.concurrencies},
            "input_len": None if self.dataset else self.input_len,
            "output_len": self.output_len if (self.output_len or self.dataset) else 128,
            "dataset": str(self.dataset.source) if self.dataset else None,
            "dataset_format": self.dataset.name if self.dataset else "random",
            "warmup": self.warmup,
            "vllm_args": self.vllm_args,
        }


@dataclass
class Target:
    """A server to load: where, which model name to send, which tokenizer counts the tokens."""

    base_url: str  # without /v1
    model_id: str
    tokenizer: str
    backend: str | None = None  # set when bench started the server
    api_key: str | None = None


@dataclass
class Results:
    """Rows so far (one per backend and concurrency), and what failed; kept whatever happens next."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, backend: str | None, concurrency: int | None, message: str, hint: str | None = None,
             exit_code: int = 1) -> None:
        self.errors.append({"backend": backend, "concurrency": concurrency, "message": message, "hint": hint,
                            "exit_code": exit_code})


# ------------------------------------------------------------------------------------------- parsing

def parse_concurrency(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise VmetalError(f"`--concurrency {text}` must be positive integers separated by commas, e.g. 1,8,32",
                          exit_code=USAGE)
    return values


def parse_request_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate > 0:
        raise VmetalError(f"`--request-rate {text}` must be `inf` or a positive number of requests per second",
                          exit_code=USAGE)
    return rate


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise VmetalError(f"unknown backend `{(unknown or [text])[0]}` in `--compare {text}`",
                          hint=f"choose from {', '.join(BACKENDS)}", exit_code=USAGE)
    return list(dict.fromkeys(names))


def check_vllm_args(workload: Workload) -> None:
    """Refuse `vllm bench serve` options after `--` that a vmetal flag sets, or that vLLM cannot parse.

    Parsing needs vLLM (seconds to import), so it is only done when there are such options; it runs before
    any server starts, so a typo costs no server start-up.
    """
    for arg in workload.vllm_args:
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in OWNED:
            raise VmetalError(f"`{name}` after `--` is set by vmetal bench; use `{OWNED[name]}` instead",
                              exit_code=USAGE)
    if workload.vllm_args:
        vllm_namespace(Target("http://127.0.0.1:1", "model", "tokenizer"), workload, 1, 0)


# ------------------------------------------------------------------------------------------- the server

def normalize_url(url: str) -> str:
    """The server's root URL (`http://host:port`) from what a user types (`host:port`, `…/v1`, `…/`)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _opener() -> Any:
    import urllib.request

    # No proxies: a proxy from the environment would answer for (or refuse) a loopback server.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def list_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The server's `/v1/models`; a `VmetalError` (exit 1) when nothing answers there."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base_url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _opener().open(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        hint = ("pass the server's key with `--api-key` (or VLLM_API_KEY)" if exc.code in (401, 403) else
                "`--url` is the server's address, e.g. http://127.0.0.1:8000/v1")
        raise VmetalError(f"the server at {base_url} refused to list its models (HTTP {exc.code})",
                          hint=hint) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VmetalError(f"no server answers at {base_url} ({reason})",
                          hint="start one with `vmetal serve` (or `vmetal serve --demo`), or give MODEL "
                               "(or `--demo`) instead of `--url` to let bench start one") from None
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise VmetalError(f"the server at {base_url} answered /v1/models with something that is not a model "
                          "list; is it an OpenAI-compatible server?")
    return [m for m in models if isinstance(m, dict) and "id" in m]


def pick_model(models: list[dict[str, Any]], wanted: str | None, base_url: str) -> dict[str, Any]:
    """The entry of `models` for `wanted` (its id, or the folder vLLM loaded); the first when None."""
    if not models:
        raise VmetalError(f"the server at {base_url} serves no model")
    if wanted is None:
        return models[0]
    for m in models:
        if m["id"] == wanted:
            return m
    path = Path(wanted).expanduser()
    if path.exists():
        for m in models:
            root = m.get("root")
            if isinstance(root, str) and Path(root).expanduser().exists() and \
                    Path(root).expanduser().resolve() == path.resolve():
                return m
    listing = ", ".join(f"`{m['id']}`" for m in models)
    raise VmetalError(f"the server at {base_url} does not serve `{wanted}` (it serves {listing})",
                      hint="leave MODEL out to benchmark the server's first model")


def target_at(url: str, wanted: str | None, api_key: str | None, tokenizer: str | None = None) -> Target:
    """A running server: checks it answers, and finds the model to send and a tokenizer for it."""
    base = normalize_url(url)
    entry = pick_model(list_models(base, api_key), wanted, base)
    root = entry.get("root") if isinstance(entry.get("root"), str) else None
    if tokenizer is None:
        # vLLM's `root` is what the server loaded: a folder here when it runs on this machine, else a Hub id.
        if wanted and Path(wanted).expanduser().is_dir():
            tokenizer = str(Path(wanted).expanduser().resolve())
        else:
            tokenizer = root or entry["id"]
    return Target(base, entry["id"], tokenizer, api_key=api_key)


def backend_config(backend: str, environ: Mapping[str, str] | None = None) -> Any:
    """The validated VLLM_METAL_* config of `backend` on top of `environ` (default ours); `VmetalError` when
    this build cannot run it."""
    try:
        cfg = envs.load_config(os.environ if environ is None else environ, overrides=BACKEND_ENV[backend])
        envs.check_available(cfg)
    except envs.EnvError as exc:
        if backend == "torch" and exc.variable == envs.USE_MLX:
            raise VmetalError(f"torch: {NOT_AVAILABLE}") from None
        raise VmetalError(f"{backend}: {exc}", exit_code=USAGE) from None
    return cfg


def last_error_line(lines: Sequence[str]) -> str | None:
    """The last line that looks like a raised exception (`SomethingError: …`), e.g. of a server's log."""
    for line in reversed(lines):
        head, sep, _ = line.strip().partition(":")
        if sep and " " not in head and head.endswith(("Error", "Exception", "Exit", "Interrupt")):
            return line.strip()[:400]
    return None


def refused_torch(exc: Exception) -> bool:
    """Whether a server start failed because the engine has no PyTorch compute path."""
    text = str(exc) + "\n".join(getattr(exc, "tail", []))
    return "VLLM_METAL_USE_MLX" in text and ("does not have" in text or "not supported" in text
                                             or "not available" in text)


def sized_server_args(model_dir: str, args: Sequence[str], workload: Workload) -> list[str]:
    """`vllm serve` arguments for a server bench starts: the user's, plus what they leave open.

    - `--max-num-seqs`: the highest concurrency (never more are in flight);
    - `--max-model-len`: prompt + output + 64 for random prompts (a dataset's lengths are unknown: vLLM's);
    - `--kv-cache-memory-bytes`: room for max-num-seqs sequences of max-model-len, the same for every
      backend. Left to itself the paged path sizes its pools from device memory
      (`VLLM_METAL_MEMORY_FRACTION=auto`, 0.9 of it, which on a CPU host is all RAM) while the MLX-managed
      path grows on demand: a comparison would measure two different memory budgets. Not set when the
      user gave it or set VLLM_METAL_MEMORY_FRACTION.

    Whatever the user gave (flags or `--serve-args`) is kept as given.
    """
    from vmetal.preflight import fit

    out = list(args)
    seqs_given = fit.vllm_arg(out, "--max-num-seqs")
    len_given = fit.vllm_arg(out, "--max-model-len")
    seqs = int(seqs_given) if seqs_given and seqs_given.isdigit() else max(workload.concurrencies)
    if seqs_given is None:
        out[:0] = ["--max-num-seqs", str(seqs)]
    length: int | None = int(len_given) if len_given and len_given.isdigit() else None
    if len_given is None and workload.dataset is None:
        length = workload.input_len + (workload.output_len or 128) + 64
        out[:0] = ["--max-model-len", str(length)]
    user_fraction = os.environ.get(envs.MEMORY_FRACTION, "").strip() not in ("", "auto")
    config = fit.read_config(model_dir)
    if fit.vllm_arg(out, "--kv-cache-memory-bytes") is None and not user_fraction and config is not None:
        try:
            per_token = fit.kv_bytes_per_token(config)
        except fit.ConfigShapeError:
            return out
        block = envs.load_config(os.environ).block_size
        tokens = -(-(length or fit.default_max_model_len(config)) // block) * block
        out[:0] = ["--kv-cache-memory-bytes", str(per_token * (seqs * tokens + 2 * block))]
    return out


def backend_server(backend: str, model_dir: str, name: str, *, log_path: Path, api_key: str | None = None,
                   vllm_args: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Any:
    """A `ServerProcess` (not started) serving `model_dir` as `name` with `backend`'s settings on a free port.

    `environ` replaces ours as the server's base environment (a benchmark passes one without the user's
    VLLM_METAL_* settings, so its numbers do not depend on them); the backend's settings go on top.
    """
    from vmetal.server.process import ServerProcess, free_port

    cfg = backend_config(backend, environ)
    return ServerProcess(model_dir, port=free_port(), served_model_name=name, api_key=api_key, config=cfg,
                         vllm_args=[*backend_vllm_args(backend), *vllm_args], environ=environ, echo=False,
                         log_path=log_path)


@contextlib.contextmanager
def own_server(backend: str, model_dir: str, name: str, *, api_key: str | None, vllm_args: Sequence[str],
               ready_timeout: float, log_path: Path, say: Callable[[str], None]) -> Iterator[Target]:
    """A `vllm serve` of `model_dir` with `backend`'s settings on a free port, stopped when the block ends."""
    from vmetal.server.process import ServerError

    server = backend_server(backend, model_dir, name, api_key=api_key, vllm_args=vllm_args, log_path=log_path)
    say(f"{backend}: starting a server for {name} (vLLM's log: {log_path})")
    t0 = time.perf_counter()
    try:
        server.start()
        try:
            server.wait_ready(ready_timeout)
        except ServerError as exc:
            if backend == "torch" and refused_torch(exc):
                raise VmetalError(f"torch: {NOT_AVAILABLE}") from None
            what = str(exc).split("; its last lines:")[0]
            cause = last_error_line(exc.tail)
            raise VmetalError(f"{backend}: the server did not start: {what}" + (f" ({cause})" if cause else ""),
                              hint=f"its log is {log_path}") from None
        say(f"{backend}: ready in {time.perf_counter() - t0:.0f} s")
        yield Target(server.base_url, name, model_dir, backend=backend, api_key=api_key)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- the load

def vllm_namespace(target: Target, workload: Workload, concurrency: int, warmups: int) -> Any:
    """The `vllm bench serve` arguments of one run, parsed by vLLM's own parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--base-url", target.base_url, "--model", target.model_id, "--tokenizer", target.tokenizer,
            "--max-concurrency", str(concurrency), "--request-rate", str(workload.request_rate),
            "--num-prompts", str(workload.prompts_for(concurrency)), "--num-warmups", str(warmups),
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", PERCENTILES,
            "--seed", str(workload.seed), "--save-detailed"]
    ds = workload.dataset
    if ds is None:
        argv += ["--dataset-name", "random", "--input-len", str(workload.input_len),
                 "--output-len", str(workload.output_len or 128)]
    elif ds.name == CUSTOM:
        # -1: each record's own `output_tokens`; otherwise every request gets the same length.
        length = workload.output_len or (-1 if ds.all_have_output_tokens else 128)
        argv += ["--dataset-name", CUSTOM, "--dataset-path", str(ds.path), "--custom-output-len", str(length)]
    elif ds.name == SHAREGPT:
        argv += ["--dataset-name", SHAREGPT, "--dataset-path", str(ds.path)]
        if workload.output_len:
            argv += ["--sharegpt-output-len", str(workload.output_len)]
    if target.api_key:
        argv += ["--header", f"Authorization=Bearer {target.api_key}"]
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)

    def refuse(message: str) -> None:
        raise VmetalError(f"`vllm bench serve` options after `--`: {message}", exit_code=USAGE)

    parser.error = refuse  # type: ignore[method-assign]
    ns = parser.parse_args(argv + list(workload.vllm_args))
    if ns.temperature is None:
        ns.temperature = 0.0  # greedy unless asked: repeatable, and the server's fastest sampling path
    ns.disable_tqdm = not sys.stderr.isatty()
    return ns


def _summarize(result: dict[str, Any], concurrency: int, num_prompts: int, backend: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": backend or "server", "concurrency": concurrency, "num_prompts": num_prompts}
    for key in RUN_KEYS:
        row[key] = result.get(key)
    row["duration_s"] = row.pop("duration")
    for metric in METRICS:
        for stat in STATS:
            value = result.get(f"{stat}_{metric}_ms")
            row[f"{stat}_{metric}_ms"] = None if value is None else float(value)
    errors = [e for e in result.get("errors") or [] if e]
    row["errors"] = sorted({str(e).strip().splitlines()[0][:300] for e in errors if str(e).strip()})[:3]
    return row


@contextlib.contextmanager
def checked_custom_dataset(dataset: Dataset | None) -> Iterator[None]:
    """While the block runs, vLLM samples our checked JSONL records with its own `CustomDataset.sample`.

    vLLM's `CustomDataset.load_data` reads the file with pandas, which vLLM itself does not install (its
    `bench` extra does; without it the error is a PackageNotFoundError about vLLM's own metadata). The
    records are already parsed and checked (`vmetal.bench.dataset`), so `get_samples` is wrapped for this
    one file: the class is vLLM's with `load_data` fed from them (shuffled as vLLM shuffles), and the
    arguments of `sample` are those `get_samples` passes for `--dataset-name custom`. Any other dataset goes
    to vLLM's `get_samples` unchanged.
    """
    if dataset is None or dataset.name != CUSTOM:
        yield
        return
    import json
    import random

    import vllm.benchmarks.serve as vllm_serve
    from vllm.benchmarks.datasets.datasets import CustomDataset

    records = [json.loads(line) for line in dataset.path.read_text(encoding="utf-8").splitlines() if line]

    class CheckedCustomDataset(CustomDataset):
        def load_data(self) -> None:
            self.data = [dict(r) for r in records]
            random.seed(self.random_seed)
            if not getattr(self, "disable_shuffle", False):
                random.shuffle(self.data)

    original = vllm_serve.get_samples

    def get_samples(args: Any, tokenizer: Any, **kwargs: Any) -> Any:
        if args.dataset_name != CUSTOM or args.dataset_path != str(dataset.path):
            return original(args, tokenizer, **kwargs)
        return CheckedCustomDataset(dataset_path=args.dataset_path, disable_shuffle=args.disable_shuffle,
                                    random_seed=args.seed).sample(
            num_requests=args.num_prompts, tokenizer=tokenizer, output_len=args.custom_output_len,
            skip_chat_template=args.skip_chat_template,
            chat_template_kwargs=getattr(args, "chat_template_kwargs", None),
            request_id_prefix=args.request_id_prefix, no_oversample=args.no_oversample)

    vllm_serve.get_samples = get_samples
    try:
        yield
    finally:
        vllm_serve.get_samples = original


def run_level(target: Target, workload: Workload, concurrency: int, warmups: int, log: TextIO) -> dict[str, Any]:
    """One `vllm bench serve` run at `concurrency`; its summary row."""
    import asyncio

    from vllm.benchmarks.serve import main_async

    ns = vllm_namespace(target, workload, concurrency, warmups)
    print(f"\n===== {target.backend or 'server'} C={concurrency} ({time.strftime('%H:%M:%S')})", file=log,
          flush=True)
    with contextlib.redirect_stdout(log), checked_custom_dataset(workload.dataset), warnings.catch_warnings():
        # vLLM's "All requests failed" warning: run_levels reports that itself, with the first error.
        warnings.simplefilter("ignore", UserWarning)
        result = asyncio.run(main_async(ns))
    log.flush()
    return _summarize(result, concurrency, workload.prompts_for(concurrency), target.backend)


def run_levels(target: Target, workload: Workload, results: Results, log: TextIO,
               say: Callable[[str], None]) -> bool:
    """Every concurrency against `target`, rows appended as they finish; False after the first failure."""
    label = target.backend or target.base_url
    for i, c in enumerate(workload.concurrencies):
        warmups = workload.warmup if i == 0 else 0
        say(f"{label}: C={c}: {workload.prompts_for(c)} requests"
            + (f" after {warmups} warm-up request(s)" if warmups else ""))
        try:
            row = run_level(target, workload, c, warmups, log)
        except VmetalError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM's errors (tokenizer, dataset, …) end this backend
            message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            results.fail(target.backend, c, message[:400], hint=f"vLLM's client output is in {log.name}")
            say(f"{label}: C={c} failed: {message[:400]}")
            return False
        if row["completed"] == 0:  # nothing was measured: an error, not a row of zeros
            first = row["errors"][0] if row["errors"] else "no error message"
            results.fail(target.backend, c, f"all {row['num_prompts']} requests failed: {first}",
                         hint=f"vLLM's client output is in {log.name}")
            say(f"{label}: C={c}: all {row['num_prompts']} requests failed: {first}")
            return False
        results.runs.append(row)
        failed = f", {row['failed']} FAILED" if row["failed"] else ""
        say(f"{label}: C={c}: {row['completed']}/{row['num_prompts']} ok{failed}, "
            f"{row['output_throughput']:.1f} output tok/s, TTFT p50 {row['median_ttft_ms']:.0f} ms")
    return True


def run_backends(backends: Sequence[str], model_dir: str, name: str, workload: Workload, results: Results,
                 log: TextIO, say: Callable[[str], None], *, api_key: str | None, server_args: Sequence[str],
                 ready_timeout: float, log_dir: Path) -> None:
    """Each backend in turn: its own server, every concurrency; one that cannot start is noted, not fatal."""
    for backend in backends:
        try:
            with own_server(backend, model_dir, name, api_key=api_key, vllm_args=server_args,
                            ready_timeout=ready_timeout, log_path=log_dir / f"bench-server-{backend}.log",
                            say=say) as target:
                run_levels(target, workload, results, log, say)
        except VmetalError as exc:
            message = exc.message.removeprefix(f"{backend}: ")
            results.errors.append({"backend": backend, "concurrency": None, "message": message,
                                   "hint": exc.hint, "skipped": message == NOT_AVAILABLE,
                                   "exit_code": exc.exit_code})
            say(exc.message)


def quiet_vllm_client() -> None:
    """Before vLLM is imported here: its log lines go to stderr, so stdout stays data (`--json`)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # aiohttp trusts proxy variables; a loopback server must never go through one.
    if any(os.environ.get(v) for v in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")):
        extra = "127.0.0.1,localhost,::1"
        for var in ("NO_PROXY", "no_proxy"):
            os.environ[var] = ",".join(x for x in (os.environ.get(var), extra) if x)


def ratios(results: Results, baseline: str) -> list[dict[str, Any]]:
    """Per concurrency and other backend: its throughput / the baseline's, and latency baseline / its.

    Both read "higher is better for that backend".
    """
    return against(results.runs, baseline, by="concurrency",
                   higher=("request_throughput", "output_throughput", "total_token_throughput"),
                   lower=("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms"))
