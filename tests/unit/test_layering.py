"""The package layout's rules (README "How it works"), checked on the source and in a fresh interpreter.

- Importing the CLI's app, the hub, the pre-flight checks or the package root loads no mlx, torch or vllm:
  `vmetal --help`, Tab completion and `vmetal list` stay instant.
- mlx, torch and vllm are imported at module level only in `vmetal/engine/` (and in the two modules that run
  inside the server child: the `vllm` shim and the API-key middleware).
- Nothing outside `vmetal/cli/` imports `vmetal.cli`.
- No import circles between vmetal's modules, counting imports inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.support import REPO

PACKAGE = REPO / "vmetal"
HEAVY = ("mlx", "mlx_lm", "torch", "vllm")
# Modules that run only inside vLLM's server child, where vLLM is already loaded.
SERVER_CHILD = {"vmetal.server.vllm_cli", "vmetal.server.api_auth"}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path, *, top_level_only: bool = False) -> list[str]:
    """Dotted names each `import` statement of the file loads (`from P import n` is `P.n` when that is a
    module of vmetal, else `P`)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [s for s in subs if s in MODULES] or [node.module]
    return found


def test_the_scan_sees_the_package():
    assert {"vmetal", "vmetal.engine.worker", "vmetal.cli.app", "vmetal.hub.pull"} <= set(MODULES)
    assert "vmetal.hub.common" in imports(MODULES["vmetal.hub.pull"])  # `from vmetal.hub import common`


def test_cli_app_hub_and_preflight_import_no_mlx_torch_or_vllm():
    code = ("import sys\n"
            "import vmetal, vmetal.cli.app, vmetal.hub, vmetal.preflight, vmetal.preflight.fit, "
            "vmetal.preflight.host, vmetal.preflight.checkpoint, vmetal.preflight.model_files, vmetal.hub.sources, "
            "vmetal.hub.huggingface_store, vmetal.hub.modelscope_store, vmetal.server.process, vmetal.chat.client, "
            "vmetal.errors, vmetal.envs\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(' '.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_heavy_imports_at_module_level_only_in_the_engine(name):
    if name.startswith("vmetal.engine") or name in SERVER_CHILD:
        return
    heavy = [m for m in imports(MODULES[name], top_level_only=True) if m.split(".")[0] in HEAVY]
    assert heavy == [], f"{name} imports {heavy} at module level; import them inside the functions that need them"


def test_nothing_outside_cli_imports_cli():
    offenders = {name: [m for m in imports(path) if m == "vmetal.cli" or m.startswith("vmetal.cli.")]
                 for name, path in MODULES.items() if not name.startswith("vmetal.cli")}
    assert {k: v for k, v in offenders.items() if v} == {}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (import circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def package_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target in imports(path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_no_import_circles():
    assert strongly_connected(package_graph()) == []


def test_the_circle_check_finds_a_circle():
    graph = package_graph()
    graph["vmetal.envs"] = graph["vmetal.envs"] | {"vmetal.hub.registry"}  # registry imports envs
    assert ["vmetal.envs", "vmetal.hub.registry"] in strongly_connected(graph)
