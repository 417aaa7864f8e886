"""`vmetal pull`, `vmetal list`, `vmetal rm`: the model-management commands ollama users expect.

`pull` checks everything it can from the repo's metadata and `config.json` (id, access, architecture,
memory fit) before the first weight byte, then downloads through `vmetal.hub_store` (or
`vmetal.modelscope_store`) with one progress line per file and a total (shown by `vmetal.cli.pull_view`),
and records the model in `vmetal.registry` only once every file is verified. Data (`--json`, the `list`
table) goes to stdout, everything else to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli.errors import USAGE, VmetalError, warn
from vmetal.cli.pull_view import human_ago, human_size, progress_for, report_pull, say

_SOURCE_HELP = ("Where to pull from: `huggingface` (`hf`, the default) or `modelscope`. "
                "Default: `modelscope` when VLLM_USE_MODELSCOPE is true.")

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", show_default=False,
                                         help="Hub id (`org/name`) or a local model folder (checked, not copied).")]
SourceOption = Annotated[str | None, typer.Option("--source", help=_SOURCE_HELP, show_default=False)]
RevisionOption = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit. Default: main "
                                                    "(master on ModelScope).", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]


# ----------------------------------------------------------------------------------------- checks


def _check_architecture(config: dict, where: str) -> str:
    from vmetal.models import UnsupportedModelError, check_architecture, supported_list

    try:
        return check_architecture(config, where=where)
    except UnsupportedModelError as exc:
        raise VmetalError(str(exc), hint=f"vmetal serves {supported_list()}; nothing was downloaded") from None


def _check_config(config: dict, where: str) -> None:
    # Before any weight byte: a config with absurd shape fields would only fail at load.
    from vmetal.model_checks import ModelFileError, check_config

    try:
        check_config(config, Path(where))
    except ModelFileError as exc:
        raise VmetalError(f"{exc}; nothing else was downloaded", exit_code=1) from None


def _fit(config: dict, weight_bytes: int, max_model_len: int | None, force: bool, quiet: bool,
         model: str) -> Any:
    from vmetal import fit

    length = max_model_len or fit.default_max_model_len(config)
    try:
        report = fit.estimate(config, weight_bytes, max_model_len=length)
    except fit.ConfigShapeError as exc:
        warn(f"no fit check for `{model}`: {exc}")
        return None
    line = f"fit: {report.describe()}"
    if report.verdict == "does not fit":
        if not force:
            raise VmetalError(f"`{model}` does not fit in this machine's memory: {report.describe()}",
                              hint=f"{report.advice()}; `--force` pulls it anyway")
        warn(f"{line} (pulling anyway: --force)")
    elif report.verdict == "tight":
        warn(f"{line}; {report.advice()}")
    else:
        say(line, quiet=quiet)
    return report


def _check_local(path: Path, max_model_len: int | None, force: bool, quiet: bool, json_out: bool) -> None:
    from vmetal import fit
    from vmetal.models import ModelNotFoundError, UnsupportedModelError, read_config

    from vmetal.model_checks import check_folder

    check_folder(path)  # every file readable and consistent, each problem named by its file
    try:
        config = read_config(path)
    except (ModelNotFoundError, UnsupportedModelError) as exc:
        raise VmetalError(str(exc), exit_code=USAGE) from None
    _check_architecture(config, str(path / "config.json"))
    weights = sorted(p.name for p in path.glob("model*.safetensors"))
    if not weights:
        raise VmetalError(f"`{path}` has no `model*.safetensors` weights, which is what vmetal loads",
                          exit_code=USAGE)
    report = _fit(config, fit.weight_bytes_of(path), max_model_len, force, quiet or json_out, str(path))
    say(f"`{path}` is a local model folder: checked, nothing to download", quiet=quiet or json_out)
    if json_out:
        print(json.dumps({"model": str(path), "source": "local", "path": str(path),
                          "fit": report.as_dict() if report else None}))


# ----------------------------------------------------------------------------------------- pull


def _plan_files(remote, include: list[str], force: bool, quiet_msgs: bool, where: str):
    """The files to fetch from either hub's listing: (files, weight names, weight bytes, total bytes).

    Refuses a repo without safetensors weights unless `force`, and says which weights it skips.
    """
    from vmetal import hub_common

    names = hub_common.select_files([f.path for f in remote.files], include)
    files = [f for f in remote.files if f.path in set(names)]
    weights = hub_common.weight_files(names)
    if not weights:
        others = hub_common.other_weights(f.path for f in remote.files)
        listed = ", ".join(f"`{p}`" for p in others[:5]) or "none"
        message = (f"`{remote.repo_id}` has no `model*.safetensors` weights (other weight files: {listed}); "
                   "vmetal loads safetensors only")
        if not force:
            raise VmetalError(message, hint="pick a safetensors (or MLX) conversion of this model; `--force` "
                                            "downloads the rest anyway")
        warn(message)
    weight_bytes = sum(f.size for f in files if f.path in weights)
    total = sum(f.size for f in files)
    say(f"{remote.repo_id} @ {where}: {len(files)} files, {human_size(total)}", quiet=quiet_msgs)
    skipped = [f.path for f in remote.files if f.path not in set(names)]
    if skipped and not quiet_msgs:
        heavy = hub_common.other_weights(skipped)
        if heavy:
            say(f"skipping {len(heavy)} weight file(s) serving does not load ({', '.join(heavy[:3])}"
                f"{', …' if len(heavy) > 3 else ''}); `--include PATTERN` fetches them")
    return files, weights, weight_bytes, total


def _record_complete(entry: Any, snap: Path) -> None:
    """Only now, with every file verified and in its snapshot folder, may `serve` and `list` trust the entry."""
    from vmetal import registry

    entry.path = str(snap)
    entry.status = registry.COMPLETE
    entry.pulled_at = time.time()
    registry.upsert(entry)


def pull(
    model: ModelArg,
    source: SourceOption = None,
    revision: RevisionOption = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Also download files matching this pattern (repeatable), e.g. `'*.gguf'`; "
                          "by default only what serving needs.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Pull even when the fit check says it does not fit "
                                                        "or the repo has no safetensors weights.")] = False,
    max_model_len: Annotated[int | None, typer.Option(
        min=1, help="Context length for the fit check. Default: what `serve` would use.",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no messages; errors only.")]
    = False,
    json_out: JsonOption = False,
) -> None:
    """Download MODEL for serving: config, tokenizer and safetensors weights, resumable and verified."""
    from vmetal.hub_common import HubError

    try:
        _pull(model, source, revision, include or [], force, max_model_len, quiet, json_out)
    except HubError as exc:
        raise VmetalError(exc.message, hint=exc.hint, exit_code=exc.exit_code) from None


def _pull(model: str, source: str | None, revision: str | None, include: list[str], force: bool,
          max_model_len: int | None, quiet: bool, json_out: bool) -> None:
    from vmetal import hub, hub_common, hub_store, registry

    src = hub_common.resolve_source(source)
    if hub_common.looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise VmetalError(f"model folder `{model}` does not exist", exit_code=USAGE)
        _check_local(path.resolve(), max_model_len, force, quiet, json_out)
        return
    if src == hub_common.MODELSCOPE:
        _pull_modelscope(model, revision, include, force, max_model_len, quiet, json_out)
        return

    quiet_msgs = quiet or json_out
    remote = hub.fetch_info(model, revision=revision)
    files, weights, weight_bytes, total = _plan_files(
        remote, include, force, quiet_msgs, f"{remote.revision} ({remote.commit[:12]})")

    with hub_store.pull_lock(remote.repo_id):
        config = hub_store.fetch_json(remote, "config.json")
        _check_architecture(config, f"{remote.repo_id}/config.json")
        _check_config(config, f"{remote.repo_id}/config.json")
        report = _fit(config, weight_bytes, max_model_len, force, quiet_msgs, remote.repo_id) if weights \
            else None

        entry = registry.PulledModel(id=remote.repo_id, source=src, revision=remote.revision,
                                     commit=remote.commit, path=str(hub.snapshot_path(remote)),
                                     size=total, files=len(files), status=registry.INCOMPLETE)
        # Incomplete until every file is verified again: a damaged blob is deleted before its refetch.
        registry.upsert(entry)
        with progress_for(remote.repo_id, quiet_msgs) as view:
            stats = hub_store.download(remote, files, progress=view)
        _record_complete(entry, hub_store.finalize(remote, files))

    report_pull(entry, stats, files, report, origin="", serve_hint=f"`vmetal serve {remote.repo_id}`",
                quiet_msgs=quiet_msgs, json_out=json_out)


def _pull_modelscope(model: str, revision: str | None, include: list[str], force: bool,
                     max_model_len: int | None, quiet: bool, json_out: bool) -> None:
    """`pull` from ModelScope (`vmetal.modelscope_hub`, `vmetal.modelscope_store`): the same checks, order and
    output as from Hugging Face."""
    from vmetal import modelscope_store, registry
    from vmetal import modelscope_hub as ms
    from vmetal.hub_common import MODELSCOPE

    # Before anything else: without ModelScope's client the pull says how to get it (never a silent Hugging Face
    # pull). `import modelscope` itself is not needed and costs seconds (torch).
    ms.require_client()
    quiet_msgs = quiet or json_out
    remote = ms.fetch_info(model, revision=revision)
    files, weights, weight_bytes, total = _plan_files(
        remote, include, force, quiet_msgs, f"{remote.revision} from ModelScope ({remote.endpoint})")

    with modelscope_store.pull_lock(remote.repo_id, remote.cache):
        with progress_for(remote.repo_id, True) as silent:
            config = modelscope_store.fetch_json(remote, "config.json", progress=silent)
        _check_architecture(config, f"{remote.repo_id}/config.json")
        _check_config(config, f"{remote.repo_id}/config.json")
        report = _fit(config, weight_bytes, max_model_len, force, quiet_msgs, remote.repo_id) if weights \
            else None

        entry = registry.PulledModel(id=remote.repo_id, source=MODELSCOPE, revision=remote.revision,
                                     commit=None, path=str(remote.snapshot), size=total, files=len(files),
                                     status=registry.INCOMPLETE, extra={"endpoint": remote.endpoint})
        # Incomplete until every file is verified and in the snapshot folder.
        registry.upsert(entry)
        with progress_for(remote.repo_id, quiet_msgs) as view:
            stats = modelscope_store.download(remote, files, progress=view)
            snap = modelscope_store.finalize(remote, files, progress=view)
        _record_complete(entry, snap)

    report_pull(entry, stats, files, report, origin=" from ModelScope",
                serve_hint=f"`vmetal serve {snap}` (or `VLLM_USE_MODELSCOPE=true vmetal serve {remote.repo_id}`)",
                quiet_msgs=quiet_msgs, json_out=json_out, extra={"endpoint": remote.endpoint})


# ----------------------------------------------------------------------------------------- list / rm


def _status(m: Any) -> str:
    if not m.complete:
        return "incomplete"
    return "ok" if Path(m.path).is_dir() else "missing"


def list_models(json_out: JsonOption = False) -> None:
    """List the models pulled: size, source, revision, when pulled and last used."""
    from vmetal import registry

    models = registry.pulled_models()
    if json_out:
        print(json.dumps([{**m.__dict__, "state": _status(m)} for m in models]))
        return
    if not models:
        say("no models pulled yet; `vmetal pull MODEL` fetches one")
        return
    # Plain aligned columns, as `ollama list`: the same on a terminal and in a pipe, never truncated.
    rows = [("MODEL", "SIZE", "SOURCE", "REVISION", "PULLED", "LAST USED", "STATUS")]
    now = time.time()
    for m in models:
        rev = m.revision if m.commit is None or m.revision == m.commit else f"{m.revision} ({m.commit[:7]})"
        rows.append((m.id, human_size(m.size), m.source, rev,
                     human_ago(m.pulled_at, now) if m.complete else "-", human_ago(m.last_used, now), _status(m)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def rm(
    model: Annotated[str, typer.Argument(metavar="MODEL", show_default=False, help="Hub id as pulled.")],
    revision: RevisionOption = None,
    source: SourceOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a pulled model (its files in the hub cache and its entry in `vmetal list`)."""
    from vmetal import hub_common, hub_store, registry

    src = hub_common.SOURCE_ALIASES.get(source.lower()) if source else None
    if source and src is None:
        raise VmetalError(f"unknown source `{source}`: expected `huggingface` or `modelscope`", exit_code=USAGE)
    entries = registry.find(model, source=src, revision=revision)
    if not entries:
        if Path(model).expanduser().is_dir():
            raise VmetalError(f"`{model}` is a local folder vmetal did not pull; it is left alone",
                              exit_code=USAGE)
        raise VmetalError(f"`{model}` is not among the pulled models", hint="`vmetal list` shows them",
                          exit_code=USAGE)
    total = sum(e.size for e in entries)
    what = ", ".join(f"{e.id} @ {e.revision}" for e in entries)
    if not yes:
        if not sys.stdin.isatty() and sys.stdin is sys.__stdin__:
            raise VmetalError(f"not removing {what} without confirmation", hint="pass `--yes`",
                              exit_code=USAGE)
        if not typer.confirm(f"Remove {what} ({human_size(total)})?", default=False, err=True):
            say("nothing removed")
            raise typer.Exit(1)
    for e in entries:
        others = [o for o in registry.pulled_models() if o.key != e.key and o.id.lower() == e.id.lower()
                  and o.source == e.source]
        if e.source == hub_common.HUGGINGFACE:
            if not any(o.commit == e.commit for o in others):
                hub_store.remove_snapshot(e.id, e.commit)
        elif e.source == hub_common.MODELSCOPE:
            from vmetal import modelscope_store

            # The folder recorded at pull time: the cache settings may have changed since.
            if not modelscope_store.remove_snapshot(e.path, e.revision) and Path(e.path).exists():
                warn(f"left {e.path} alone: not a ModelScope snapshot folder")
        registry.remove(e)
    say(f"removed {what} ({human_size(total)})")
