"""What `vmetal serve` would be given: the ENV.md variables, the port, and whether `--model` fits."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmetal import envs
from vmetal.cli.doctor.base import Check, _fail, _ok, _url_without_credentials, _warn, is_secret_name
from vmetal.preflight import batching

# Shown in the env check and the bug report besides the ENV.md table (secrets only as set/unset).
RELATED_VARIABLES = ("VMETAL_ENABLE", "VMETAL_HOME", "VLLM_TARGET_DEVICE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                     "HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE", "MODELSCOPE_DOMAIN", "HF_TOKEN",
                     "VLLM_API_KEY")


def _shown(name: str, environ: Mapping[str, str]) -> str:
    if name not in environ:
        return "unset"
    return "set (masked)" if is_secret_name(name) else _url_without_credentials(environ[name])


def _parse_one(name: str, value: str) -> str | None:
    """The error for one variable alone (combinations aside), or None when its value is valid."""
    parsers = getattr(envs, "_PARSERS", {})
    if name not in parsers:
        return None
    try:
        parsers[name][1](name, value)
    except envs.EnvError as exc:
        return str(exc)
    return None


def check_env(environ: Mapping[str, str], devices: Any) -> Check:
    title = "Environment"
    variables = []
    for var in envs.VARIABLES:
        raw = (environ.get(var.name) or "").strip()
        error = _parse_one(var.name, raw) if raw else None
        variables.append({"name": var.name, "value": raw or (var.default if var.default is not None else "unset"),
                          "source": "environment" if raw else "default", "valid": error is None, "error": error})
    related = {name: _shown(name, environ) for name in RELATED_VARIABLES}
    details: dict[str, Any] = dict(variables=variables, related=related, device=None)
    bad = [v for v in variables if v["error"]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return _fail("env", title, bad[0]["error"] + more,
                     f"fix or unset {bad[0]['name']}; allowed values are in ENV.md", **details)
    try:
        cfg = envs.load_config(environ)
    except envs.EnvError as exc:
        for v in variables:
            if v["name"] == exc.variable:
                v.update(valid=False, error=str(exc))
        fix = str(exc).rsplit("; ", 1)[-1] if "; " in str(exc) else f"fix or unset {exc.variable}"
        return _fail("env", title, f"invalid combination: {exc}", fix, **details)
    details["variables"] = [dict(v, value=value, source=source)
                            for v, (_, value, source) in zip(variables, envs.describe(cfg))]
    try:
        envs.check_available(cfg)
    except envs.EnvError as exc:
        return _fail("env", title, str(exc), f"unset {exc.variable}", **details)
    try:
        device, info = envs.resolve_mlx_device(cfg, gpu_available=lambda: devices.gpu)
    except envs.EnvError as exc:
        return _fail("env", title, str(exc), f"set {envs.MLX_DEVICE}=cpu, or unset it", **details)
    details["device"] = device
    chosen = _batch_defaults(device, devices)
    details["batch_defaults"] = dataclasses.asdict(chosen) if chosen else None
    changed = [v["name"] for v in details["variables"] if v["source"] != "default"]
    set_text = f"{len(changed)} set ({', '.join(changed)})" if changed else "all defaults"
    return _ok("env", title, f"valid; {len(variables)} variables, {set_text}; MLX device `{device}`: "
               f"{batching.describe(chosen)}", **details)


def _batch_defaults(device: str, devices: Any) -> batching.BatchDefaults | None:
    """What the engine's scheduler takes a step, unless told otherwise (`vmetal.preflight.batching`)."""
    if device != "gpu":
        return None
    facts = batching.gpu_device(devices.info or {}, metal=devices.metal,
                                cores=batching.gpu_cores() if devices.metal else None)
    return batching.batch_defaults(facts)


def check_port(host: str, port: int) -> Check:
    from vmetal.server.process import PortInUseError, check_port_free

    title = "Port"
    try:
        check_port_free(host, port)
    except PortInUseError as exc:
        other = _free_port_near(host, port)
        instead = f"`vmetal serve --port {other}`" if other else "`vmetal serve --port N`"
        return _fail("port", title, str(exc), f"stop the server that holds it, or pick another port: {instead}",
                     host=host, port=port, free=False)
    return _ok("port", title, f"{host}:{port} is free for `vmetal serve`", host=host, port=port, free=True)


def _free_port_near(host: str, port: int) -> int | None:
    from vmetal.server.process import PortInUseError, check_port_free

    for candidate in range(port + 1, min(port + 50, 65536)):
        try:
            check_port_free(host, candidate)
        except PortInUseError:
            continue
        return candidate
    return None


def check_model_fit(model: str, max_model_len: int | None) -> Check:
    from vmetal.preflight import fit

    title = "Model fit"
    path = Path(model).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not cached, or not a repo id at all
            return _warn("model_fit", title, f"`{model}` is neither a local folder nor in the Hugging Face cache",
                         "pass a local model folder, or download the model first", model=model, path=None)
    from vmetal.preflight.model_files import ModelFileError, check_folder

    try:
        check_folder(path)
    except ModelFileError as exc:
        return _fail("model_fit", title, str(exc), exc.hint or "replace or re-download that file",
                     model=model, path=str(path))
    report = fit.estimate_folder(path, max_model_len=max_model_len, held=_tokens_held(path))
    if report is None:
        return _warn("model_fit", title, f"`{model}` has no config.json with the model's shape or no *.safetensors",
                     "point --model at a Hugging Face model folder", model=model, path=str(path))
    details = dict(model=model, path=str(path), **report.as_dict())
    summary = f"`{model}`: {report.describe()}"
    if report.verdict == "does not fit":
        return _fail("model_fit", title, summary, report.advice(), **details)
    if report.verdict == "tight":
        return _warn("model_fit", title, summary, report.advice(), **details)
    return _ok("model_fit", title, summary, **details)


def _tokens_held(path: Path) -> tuple[int | None, ...]:
    """What each layer's cache keeps (sliding windows, recurrent state), as serve's fit counts it; nothing
    known when mlx-lm cannot build the model (the fit then counts every layer full-length)."""
    from vmetal.preflight.cache_types import model_state
    from vmetal.preflight.checkpoint import read_config

    try:
        return model_state(read_config(path), str(path / "config.json")).held
    except Exception:  # noqa: BLE001 - an unserved model is not this check's to judge
        return ()
