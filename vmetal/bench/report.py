"""What `vmetal bench` shows and writes: Rich tables on stdout, `--json`, `--csv`, `--plot`.

A report is a plain dict (the `--json` document, schema below), built by the commands and rendered here, so the
table, the JSON and the CSV always show the same numbers.

    {"schema": 1, "kind": "online" | "offline", "model": str, "url": str | null, "backends": [str],
     "workload": {...}, "runs": [row, ...], "ratios": [row, ...], "errors": [{"backend", "concurrency",
     "message"}], "complete": bool}

Online rows: backend, concurrency, num_prompts, completed, failed, duration_s, request_throughput (req/s),
output_throughput and total_token_throughput (tok/s), total_input_tokens, total_output_tokens,
{mean,median,p90,p99}_{ttft,tpot,itl,e2el}_ms, errors (first few distinct messages). Offline rows: backend,
prompt_len, gen_len, trials, {prefill_tps,decode_tps,ttft_ms}: {mean,std,median,min,max}, peak_memory_bytes
(MLX), peak_rss_bytes (the engine process), load_s, per_trial. Ratios compare each backend with the first of
`--compare`, oriented so that above 1 means better than the baseline.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from vmetal.errors import USAGE, VmetalError

SCHEMA = 1
LATENCY_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))
PLOT_PACKAGE = "matplotlib"


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _ratio(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _console(out: TextIO | None = None) -> Any:
    import sys

    from rich.console import Console

    stream = out or sys.stdout
    # Piped or redirected, Rich would squeeze the tables into 80 columns and wrap every header; a file
    # or a pipe gets them at their natural width instead (200 at most).
    wide = None if getattr(stream, "isatty", lambda: False)() or os.environ.get("COLUMNS") else 200
    return Console(file=stream, highlight=False, width=wide)


# ------------------------------------------------------------------------------------------- tables

def print_online(report: dict[str, Any], out: TextIO | None = None) -> None:
    from rich.table import Table

    console = _console(out)
    runs = report["runs"]
    ratios = {(r["backend"], r["concurrency"]): r for r in report.get("ratios", [])}
    baseline = report["backends"][0] if len(report["backends"]) > 1 else None
    if runs:
        t = Table(title=f"Throughput — {report['model']}", title_justify="left")
        for name in ("backend", "C", "ok", "failed", "duration s", "req/s", "output tok/s", "total tok/s"):
            t.add_column(name, justify="left" if name == "backend" else "right")
        if baseline:
            for name in (f"output tok/s vs {baseline}", f"TTFT p50 vs {baseline}", f"TPOT p50 vs {baseline}"):
                t.add_column(name, justify="right")
        for r in runs:
            cells = [r["backend"], str(r["concurrency"]), f"{r['completed']}/{r['num_prompts']}",
                     str(r["failed"]), _num(r["duration_s"]), _num(r["request_throughput"], 2),
                     _num(r["output_throughput"]), _num(r["total_token_throughput"])]
            if baseline:
                x = ratios.get((r["backend"], r["concurrency"]))
                cells += (["1.00×"] * 3 if r["backend"] == baseline else
                          [_ratio(x and x["output_throughput"]), _ratio(x and x["median_ttft_ms"]),
                           _ratio(x and x["median_tpot_ms"])])
            t.add_row(*cells, style="red" if r["failed"] else None)
        console.print(t)
        lat = Table(title="Latency (ms)", title_justify="left")
        for name in ("backend", "C", "metric", "mean", "median", "p90", "p99"):
            lat.add_column(name, justify="left" if name in ("backend", "metric") else "right")
        for r in runs:
            for i, (key, label) in enumerate(LATENCY_METRICS):
                lat.add_row(r["backend"] if i == 0 else "", str(r["concurrency"]) if i == 0 else "", label,
                            *(_num(r.get(f"{s}_{key}_ms")) for s in ("mean", "median", "p90", "p99")),
                            end_section=i == len(LATENCY_METRICS) - 1)
        console.print(lat)
        if baseline:
            console.print(f"Ratios: each backend against {baseline} at the same C; above 1× is better "
                          f"(throughput theirs/{baseline}, latency {baseline}/theirs).")
    _print_errors(console, report)


def print_offline(report: dict[str, Any], out: TextIO | None = None) -> None:
    from rich.table import Table

    console = _console(out)
    runs = report["runs"]
    baseline = report["backends"][0] if len(report["backends"]) > 1 else None
    base = next((r for r in runs if r["backend"] == baseline), None)
    if runs:
        t = Table(title=f"Single stream — {report['model']}", title_justify="left")
        for name in ("backend", "prompt", "gen", "trials", "prefill tok/s", "decode tok/s", "TTFT ms",
                     "peak MLX memory", "peak RSS"):
            t.add_column(name, justify="left" if name == "backend" else "right")
        if baseline:
            t.add_column(f"decode vs {baseline}", justify="right")
        speculated = any(r.get("spec_draft_tokens") is not None for r in runs)
        if speculated:
            t.add_column("drafts kept", justify="right")
        for r in runs:
            cells = [r["backend"], str(r["prompt_len"]), str(r["gen_len"]), str(r["trials"]),
                     _spread(r["prefill_tps"]), _spread(r["decode_tps"]), _spread(r["ttft_ms"]),
                     _bytes(r.get("peak_memory_bytes")), _bytes(r.get("peak_rss_bytes"))]
            if baseline:
                cells.append(_ratio(_mean_ratio(r, base, "decode_tps")))
            if speculated:
                cells.append(_kept(r.get("spec_accepted_tokens"), r.get("spec_draft_tokens")))
            t.add_row(*cells)
        console.print(t)
        console.print("mean ± standard deviation over the trials; min–max in `--json`.")
    _print_errors(console, report)


def _kept(accepted: int | None, drafted: int | None) -> str:
    if drafted is None:
        return "–"
    return f"{accepted or 0:,}/{drafted:,}" + (f" ({100 * (accepted or 0) / drafted:.0f}%)" if drafted else "")


def _spread(s: dict[str, float] | None) -> str:
    if not s:
        return "–"
    return f"{s['mean']:,.1f} ± {s['std']:,.1f}"


def _mean_ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> float | None:
    if base is None or not row.get(key) or not base.get(key) or not base[key]["mean"]:
        return None
    return row[key]["mean"] / base[key]["mean"]


def _print_errors(console: Any, report: dict[str, Any]) -> None:
    from rich.text import Text

    for e in report.get("errors", []):
        where = " ".join(x for x in (e.get("backend"), f"C={e['concurrency']}" if e.get("concurrency") else None)
                         if x)
        console.print(Text.assemble(("not measured", "bold yellow"), f" ({where}): " if where else ": ",
                                    e["message"]), soft_wrap=True)


# ------------------------------------------------------------------------------------------- files

def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("per_trial",):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}_{sub}"] = v
        elif isinstance(value, list):
            out[key] = " | ".join(str(v) for v in value)
        else:
            out[key] = value
    return out


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    """One line per run (backend and concurrency, or backend offline); ratio columns when comparing."""
    ratios = {(r["backend"], r.get("concurrency")): r for r in report.get("ratios", [])}
    rows = []
    for run in report["runs"]:
        row = _flat(run)
        x = ratios.get((run["backend"], run.get("concurrency")))
        if x:
            row.update({f"{k}_vs_{x['baseline']}": v for k, v in x.items()
                        if k not in ("backend", "baseline", "concurrency")})
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path).expanduser()
    try:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns or ["backend"])
            writer.writeheader()
            writer.writerows(rows)
    except OSError as exc:
        raise VmetalError(f"cannot write `{path}`: {exc.strerror or exc}") from None


def check_output(path: str | Path) -> None:
    """Before any work: a file named by `--csv` or `--plot` can be created (its folder exists)."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise VmetalError(f"cannot write `{path}`: folder `{parent}` does not exist", exit_code=USAGE)


def check_plot(path: str | Path) -> None:
    """Before any work: matplotlib is there and the file can be written, else one error line."""
    if importlib.util.find_spec(PLOT_PACKAGE) is None:
        raise VmetalError(f"`--plot` needs the `{PLOT_PACKAGE}` package, which is not installed",
                          hint=f"install it into vmetal's environment: `pip install {PLOT_PACKAGE}`",
                          exit_code=USAGE)
    check_output(path)


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Output tok/s and latency (TTFT, TPOT, E2E median) against concurrency, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in report["backends"] or ["server"]:
        rows = sorted((r for r in report["runs"] if r["backend"] == backend), key=lambda r: r["concurrency"])
        if not rows:
            continue
        cs = [r["concurrency"] for r in rows]
        left.plot(cs, [r["output_throughput"] for r in rows], marker="o", label=backend)
        for key, style in (("median_ttft_ms", "-"), ("median_tpot_ms", "--"), ("median_e2el_ms", ":")):
            right.plot(cs, [r[key] for r in rows], style, marker="o",
                       label=f"{backend} {key.split('_')[1].upper()} p50")
    for ax, title, ylabel in ((left, "Throughput", "output tok/s"), (right, "Latency", "ms (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    right.set_yscale("log")
    fig.suptitle(str(report["model"]))
    fig.tight_layout()
    fig.savefig(Path(path).expanduser(), dpi=120)
    plt.close(fig)
