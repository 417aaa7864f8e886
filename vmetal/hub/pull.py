"""A pull, from either hub, in the order that makes a wrong id or an oversized model cost no gigabytes; and
`ensure_local`, the one way `serve`, `convert`, `chat` and `bench` turn MODEL into a folder.

`pull` checks everything it can from the repo's listing and `config.json` (id, access, architecture, memory
fit) before the first weight byte, downloads through the chosen `Hub` with per-file progress, and records the
model in the registry only once every file is verified. What it has to say goes through a `PullView`
(messages, warnings, progress): the CLI shows it, other callers may stay silent. Errors are `HubError` or
`VmetalError`, one line each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmetal.errors import USAGE, VmetalError
from vmetal.hub import common, registry
from vmetal.hub.common import DownloadStats, PullProgress, RemoteFile
from vmetal.hub.sources import Hub, hub_for


class PullView(Protocol):
    """What a pull tells its user."""

    def say(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def progress(self, repo_id: str) -> contextlib.AbstractContextManager[PullProgress]: ...


class SilentView:
    """Says nothing; warnings are not errors, so they are dropped too."""

    def say(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...

    @contextlib.contextmanager
    def progress(self, repo_id: str) -> Iterator[PullProgress]:
        yield PullProgress()


@dataclass
class PullResult:
    path: Path  # the folder to load
    entry: registry.PulledModel | None = None  # its registry entry, complete; None for a local folder
    files: list[RemoteFile] = field(default_factory=list)
    stats: DownloadStats | None = None  # None for a local folder: nothing was downloaded
    fit: Any = None  # vmetal.preflight.fit.FitReport, when the fit could be judged


# ----------------------------------------------------------------------------------------- checks


def _check_architecture(config: dict, where: str, kv_path: str | None = None) -> tuple[int | None, ...]:
    """Refuse, before any weight byte, a model that `kv_path` (None: every KV path) cannot serve, decided by the
    caches mlx-lm makes for it; the tokens each of its layers keeps (`ModelState.held`), for the fit."""
    from vmetal.preflight.cache_types import check_model
    from vmetal.preflight.checkpoint import UnsupportedModelError

    try:
        return check_model(config, where, kv_path).held
    except UnsupportedModelError as exc:
        raise VmetalError(str(exc), hint="nothing was downloaded; the README's table lists the families "
                                         "vmetal serves") from None


def _check_config(config: dict, where: str) -> None:
    # Before any weight byte: a config with absurd shape fields would only fail at load.
    from vmetal.preflight.model_files import ModelFileError, check_config

    try:
        check_config(config, Path(where))
    except ModelFileError as exc:
        raise VmetalError(f"{exc}; nothing else was downloaded") from None


def _fit(config: dict, weight_bytes: int, max_model_len: int | None, force: bool, model: str,
         view: PullView, held: tuple[int | None, ...] = ()) -> Any:
    from vmetal.preflight import fit

    length = max_model_len or fit.default_max_model_len(config)
    try:
        report = fit.estimate(config, weight_bytes, max_model_len=length, held=held)
    except fit.ConfigShapeError as exc:
        view.warn(f"no fit check for `{model}`: {exc}")
        return None
    line = f"fit: {report.describe()}"
    if report.verdict == "does not fit":
        if not force:
            raise VmetalError(f"`{model}` does not fit in this machine's memory: {report.describe()}",
                              hint=f"{report.advice()}; `--force` pulls it anyway")
        view.warn(f"{line} (pulling anyway: --force)")
    elif report.verdict == "tight":
        view.warn(f"{line}; {report.advice()}")
    else:
        view.say(line)
    return report


def check_local(path: Path, *, max_model_len: int | None = None, force: bool = False,
                view: PullView = SilentView()) -> PullResult:
    """A local model folder, checked as a pull checks a hub's (nothing is copied)."""
    from vmetal.preflight import fit
    from vmetal.preflight.checkpoint import ModelNotFoundError, UnsupportedModelError, read_config
    from vmetal.preflight.model_files import check_folder

    check_folder(path)  # every file readable and consistent, each problem named by its file
    try:
        config = read_config(path)
    except (ModelNotFoundError, UnsupportedModelError) as exc:
        raise VmetalError(str(exc), exit_code=USAGE) from None
    held = _check_architecture(config, str(path / "config.json"))
    if not any(path.glob("model*.safetensors")):
        raise VmetalError(f"`{path}` has no `model*.safetensors` weights, which is what vmetal loads",
                          exit_code=USAGE)
    report = _fit(config, fit.weight_bytes_of(path), max_model_len, force, str(path), view, held)
    view.say(f"`{path}` is a local model folder: checked, nothing to download")
    return PullResult(path, fit=report)


# ----------------------------------------------------------------------------------------- pull


def _plan_files(remote: Any, include: Sequence[str], force: bool, where: str,
                view: PullView) -> tuple[list[RemoteFile], list[str], int]:
    """The files to fetch from either hub's listing: (files, weight names, total bytes).

    Refuses a repo without safetensors weights unless `force`, and says which weights it skips.
    """
    names = set(common.select_files([f.path for f in remote.files], include))
    files = [f for f in remote.files if f.path in names]
    weights = common.weight_files(sorted(names))
    if not weights:
        others = common.other_weights(f.path for f in remote.files)
        listed = ", ".join(f"`{p}`" for p in others[:5]) or "none"
        message = (f"`{remote.repo_id}` has no `model*.safetensors` weights (other weight files: {listed}); "
                   "vmetal loads safetensors only")
        if not force:
            raise VmetalError(message, hint="pick a safetensors (or MLX) conversion of this model; `--force` "
                                            "downloads the rest anyway")
        view.warn(message)
    total = sum(f.size for f in files)
    view.say(f"{remote.repo_id} @ {where}: {len(files)} files, {common.human_size(total)}")
    heavy = common.other_weights(f.path for f in remote.files if f.path not in names)
    if heavy:
        view.say(f"skipping {len(heavy)} weight file(s) serving does not load ({', '.join(heavy[:3])}"
                 f"{', …' if len(heavy) > 3 else ''}); `--include PATTERN` fetches them")
    return files, weights, total


def pull(model: str, *, source: str | None = None, revision: str | None = None, include: Sequence[str] = (),
         force: bool = False, max_model_len: int | None = None, view: PullView = SilentView(),
         kv_path: str | None = None) -> PullResult:
    """Download what serving `model` needs (or check a local folder), verified, and record it.

    `source`: `huggingface`/`hf` or `modelscope`/`ms`; None follows VLLM_USE_MODELSCOPE. `force` pulls a model
    that does not fit or has no safetensors weights (with a warning). `kv_path`: the KV path it will be served
    on (`serve` knows it), refused before the download when that path cannot hold it; None: any path.
    """
    hub = hub_for(common.resolve_source(source))
    if common.looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise VmetalError(f"model folder `{model}` does not exist", exit_code=USAGE)
        return check_local(path.resolve(), max_model_len=max_model_len, force=force, view=view)
    hub.require_client()  # before anything else: never a silent Hugging Face pull instead
    remote = hub.info(model, revision)
    files, weights, total = _plan_files(remote, include, force, hub.where(remote), view)
    weight_bytes = sum(f.size for f in files if f.path in weights)

    with hub.lock(remote):
        where = f"{remote.repo_id}/config.json"
        config = hub.fetch_json(remote, "config.json")
        held = _check_architecture(config, where, kv_path)
        _check_config(config, where)
        report = _fit(config, weight_bytes, max_model_len, force, remote.repo_id, view, held) if weights else None

        entry = hub.record(remote, files, total)
        # Incomplete until every file is verified and in the snapshot folder: a damaged blob is deleted before
        # its refetch, and `serve` and `list` trust only complete entries.
        registry.upsert(entry)
        with view.progress(remote.repo_id) as progress:
            stats = hub.download(remote, files, progress)
            snapshot = hub.finalize(remote, files, progress)
        entry.path = str(snapshot)
        entry.status = registry.COMPLETE
        entry.pulled_at = time.time()
        registry.upsert(entry)

    _closing_lines(view, hub, entry, stats, hub.serve_hint(remote, snapshot))
    return PullResult(snapshot, entry, files, stats, report)


def _closing_lines(view: PullView, hub: Hub, entry: registry.PulledModel, stats: DownloadStats, serve: str) -> None:
    if stats.downloaded == 0 and not stats.refetched:
        view.say(f"{entry.id} is up to date ({len(stats.reused)} files verified)")
    else:
        resumed = f", resumed {len(stats.resumed_from)} partial file(s)" if stats.resumed_from else ""
        view.say(f"pulled {entry.id}{hub.origin}: {common.human_size(stats.downloaded)} downloaded{resumed}, every file "
                 "verified")
    view.say(f"serve it with {serve}")


# ----------------------------------------------------------------------------------------- using it


def pulled_copy(model: str) -> Path | None:
    """The newest complete pull of hub id `model` from the configured source whose folder is still there."""
    done = [e for e in registry.find(model, source=common.resolve_source(None))
            if e.complete and Path(e.path).is_dir()]
    entry = max(done, key=lambda e: e.pulled_at or 0, default=None)
    return Path(entry.path) if entry else None


def ensure_local(model: str, *, refresh: bool = True, force: bool = False, max_model_len: int | None = None,
                 view: PullView = SilentView(), kv_path: str | None = None) -> Path:
    """The local folder of `model`: a folder as given, or a hub id pulled first.

    `refresh`: pull even when a complete copy is there (a no-op apart from verifying it, unless the revision
    moved on); otherwise a complete copy is used as is, which works offline. Marks the model as used now.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or common.looks_local(model):
        raise VmetalError(f"model folder `{model}` does not exist or is not a folder", exit_code=USAGE)
    folder = None if refresh else pulled_copy(model)
    if folder is None:
        folder = pull(model, force=force, max_model_len=max_model_len, view=view, kv_path=kv_path).path
    registry.touch(str(folder))
    return folder


def remove(entries: Sequence[registry.PulledModel], view: PullView = SilentView()) -> None:
    """Delete what was pulled for `entries` and forget them."""
    for entry in entries:
        others = [o for o in registry.pulled_models() if o.key != entry.key and o.id.lower() == entry.id.lower()
                  and o.source == entry.source]
        left_alone = hub_for(entry.source).remove(entry, others)
        if left_alone:
            view.warn(left_alone)
        registry.remove(entry)
