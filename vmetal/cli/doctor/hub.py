"""Where models come from and go: the two hubs' reachability, and free disk under the model caches."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmetal import envs
from vmetal.cli.doctor.base import Check, _fail, _gib, _ok, _pip, _truthy, _url_without_credentials, _warn, dist_version

HUB_TIMEOUT_S = 1.5
DISK_WARN_BYTES = 10 * 1024**3
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_MODELSCOPE_DOMAIN = "www.modelscope.cn"


def cache_dirs(environ: Mapping[str, str]) -> dict[str, Path]:
    home = Path(environ.get("HOME") or Path.home())
    xdg = Path(environ.get("XDG_CACHE_HOME") or home / ".cache")
    if environ.get("HF_HUB_CACHE"):
        hf = Path(environ["HF_HUB_CACHE"])
    else:
        hf = Path(environ.get("HF_HOME") or xdg / "huggingface") / "hub"
    ms = Path(environ.get(envs.MODELSCOPE_CACHE) or environ.get("MODELSCOPE_CACHE")
              or home / ".cache" / "modelscope")
    vm = Path(environ["VMETAL_HOME"]) if environ.get("VMETAL_HOME") else xdg / "vmetal"
    return {"huggingface": hf.expanduser(), "modelscope": ms.expanduser(), "vmetal": vm.expanduser()}


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def check_disk(environ: Mapping[str, str]) -> Check:
    title = "Disk"
    caches = [{"name": n, "path": str(p), "free_bytes": _free_bytes(p)} for n, p in cache_dirs(environ).items()]
    known = [c for c in caches if c["free_bytes"] is not None]
    details = dict(caches=caches)
    if not known:
        return _warn("disk", title, "free space of the model caches could not be read",
                     "check that $HOME is writable", **details)
    low = min(known, key=lambda c: c["free_bytes"])
    by_free: dict[int, list[str]] = {}
    for c in known:
        by_free.setdefault(c["free_bytes"], []).append(c["name"])
    summary = "; ".join(f"{_gib(free)} free for {', '.join(names)}" for free, names in by_free.items())
    if low["free_bytes"] < DISK_WARN_BYTES:
        return _warn("disk", title, f"{summary}: a 7B model needs ~15 GiB",
                     f"free space on the disk of {low['path']}, or move the cache (HF_HOME, MODELSCOPE_CACHE)",
                     **details)
    return _ok("disk", title, summary, **details)


def _reach(url: str, timeout: float) -> dict[str, Any]:
    """HEAD `url`: any HTTP answer below 500 means reachable. Timeouts read as "timed out after N s"."""
    import socket
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return {"reachable": True, "http_status": resp.status, "error": None}
    except urllib.error.HTTPError as exc:  # the server answered
        return {"reachable": exc.code < 500, "http_status": exc.code, "error": None if exc.code < 500 else str(exc)}
    except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, TLS: all mean "not usable"
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return {"reachable": False, "http_status": None, "error": f"timed out after {timeout:g} s"}
        return {"reachable": False, "http_status": None, "error": f"{type(exc).__name__}: {reason}"}


def hub_urls(environ: Mapping[str, str]) -> dict[str, str]:
    hf = (environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    domain = (environ.get("MODELSCOPE_DOMAIN") or DEFAULT_MODELSCOPE_DOMAIN).rstrip("/")
    ms = domain if "://" in domain else f"https://{domain}"
    return {"huggingface": hf, "modelscope": ms}


def check_hub_huggingface(environ: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> Check:
    title = "Hugging Face"
    url = hub_urls(environ)["huggingface"]
    shown = _url_without_credentials(url)
    if _truthy(environ.get("HF_HUB_OFFLINE")):
        return _ok("hub_huggingface", title, f"not checked: HF_HUB_OFFLINE={environ['HF_HUB_OFFLINE']} (only "
                   "local and cached models are used)", url=shown, reachable=None, http_status=None, error=None)
    result = _reach(url, timeout)
    if result["reachable"]:
        return _ok("hub_huggingface", title, f"{shown} answers (HTTP {result['http_status']})", url=shown, **result)
    return _warn("hub_huggingface", title, f"{shown} not reachable ({result['error']}); "
                 "local and cached models still work",
                 "check the network or proxy (HTTPS_PROXY); a mirror goes in HF_ENDPOINT; HF_HUB_OFFLINE=1 "
                 "skips the hub", url=shown, **result)


def check_hub_modelscope(environ: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> Check:
    title = "ModelScope"
    url = hub_urls(environ)["modelscope"]
    shown = _url_without_credentials(url)
    try:
        use = envs.load_config({envs.USE_MODELSCOPE: environ.get(envs.USE_MODELSCOPE) or ""}).use_modelscope
    except envs.EnvError:
        use = False  # reported by the env check
    if use and dist_version("modelscope") is None:
        return _fail("hub_modelscope", title, f"{envs.USE_MODELSCOPE} is on but the `modelscope` package is not "
                     "installed: hub ids cannot be downloaded", _pip("modelscope") + f", or unset "
                     f"{envs.USE_MODELSCOPE}", url=shown, reachable=None, http_status=None, error=None,
                     use_modelscope=use)
    result = _reach(url, timeout)
    if result["reachable"]:
        return _ok("hub_modelscope", title, f"{shown} answers (HTTP {result['http_status']})", url=shown,
                   use_modelscope=use, **result)
    needed = "" if use else f" (needed only with {envs.USE_MODELSCOPE}=1)"
    return _warn("hub_modelscope", title, f"{shown} not reachable ({result['error']})"
                 f"{needed}", "check the network or proxy (HTTPS_PROXY); a local ModelScope cache goes in "
                 f"{envs.MODELSCOPE_CACHE}", url=shown, use_modelscope=use, **result)

