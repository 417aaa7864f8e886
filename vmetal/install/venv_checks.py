"""What install.sh asks of a venv's own Python: does this environment match the pins, and the marker
that makes it a vmetal venv (`vmetal uninstall` deletes only venvs that have it).

Like `plan.py`, this file uses the standard library only and runs on any Python 3.8+: run as a
script, `plan.py` loads it by its path for `--check`, `--write-marker` and `--probe-url`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Dict, List, Optional

if __package__:  # vmetal.install.venv_checks
    from vmetal.install.plan import PythonVersion, UnsupportedPlatform, check_platform, python_tuple, vllm_distribution
else:  # loaded by plan.py run as a script, which registered itself as `install_plan`
    from install_plan import PythonVersion, UnsupportedPlatform, check_platform, python_tuple, vllm_distribution

MARKER_FORMAT = 1


def check_installed(
    expected: Dict[str, str],
    python_version: Optional[PythonVersion] = None,
    with_vmetal: bool = False,
) -> List[str]:
    """Problems with the running environment against the expected pins ([] = matches)."""
    from importlib import metadata

    problems = []
    try:
        check_platform(platform.system(), platform.machine(), sys.version_info)
    except UnsupportedPlatform as e:
        problems.append(str(e))
    if python_version is not None:
        want = python_tuple(python_version)
        have = sys.version_info[:2]
        if tuple(have) != want:
            problems.append("Python {}.{} in the venv, {}.{} wanted".format(*have, *want))
    for name, version in expected.items():
        try:
            have_version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} missing ({version} wanted)")
            continue
        # The macOS wheel is `0.32.0+cpu`; compare the public part.
        if have_version.split("+")[0] != version.split("+")[0]:
            problems.append(f"{name} {have_version} installed, {version} wanted")
    if with_vmetal:
        try:
            metadata.version("vmetal")
        except metadata.PackageNotFoundError:
            problems.append("vmetal is not installed")
        else:
            eps = metadata.entry_points()
            group = (
                eps.select(group="vllm.platform_plugins")
                if hasattr(eps, "select")
                else eps.get("vllm.platform_plugins", [])  # Python < 3.10
            )
            if not any(ep.name == "vmetal" for ep in group):
                problems.append("vmetal's vllm.platform_plugins entry point is missing")
    return problems


def marker_payload(
    vllm_version: str,
    mlx_extra: str,
    source: Optional[str] = None,
    editable: bool = False,
    created_by: str = "install.sh",
    previous: Optional[dict] = None,
) -> dict:
    from importlib import metadata

    def version_of(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    created_at = (previous or {}).get("created_at") or now
    return {
        "format": MARKER_FORMAT,
        "created_by": created_by,
        "vmetal_version": version_of("vmetal"),
        "vllm_version": vllm_version,
        "vllm_distribution": vllm_distribution(platform.system()),
        "mlx_version": version_of("mlx"),
        "mlx_extra": mlx_extra,
        "mlx_lm_version": version_of("mlx-lm"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": f"{platform.system()}-{platform.machine()}",
        "source": source,
        "editable": editable,
        "created_at": created_at,
        "updated_at": now,
    }


def read_marker(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def url_reachable(url: str, timeout: float = 5.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:  # the server answered: reachable
        return e.code < 500
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, TLS: all mean "not usable"
        return False
