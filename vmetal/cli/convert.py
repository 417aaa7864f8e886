"""`vmetal convert SRC DST --bits 4|8`: an MLX-quantized copy of a checkpoint, through mlx-lm's converter.

The quantizing itself is `mlx_lm.convert.convert`, the same code that makes the mlx-community checkpoints,
so what it writes loads in mlx-lm, `vmetal serve` and `mlx_lm.generate` alike. This module owns what
mlx-lm leaves to its caller: checks that fail in a second instead of after loading the weights, a DST that
appears only when complete (written into a temporary folder beside it, then renamed), and one-line errors.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from vmetal.cli.output import say
from vmetal.errors import USAGE, VmetalError

# mlx-lm quantizes these group sizes on every backend; a mode other than affine fixes its own.
GROUP_SIZES = (32, 64, 128)
MXFP4_GROUP_SIZE = 32


class Bits(str, enum.Enum):
    four = "4"
    eight = "8"


class GroupSize(str, enum.Enum):
    g32 = "32"
    g64 = "64"
    g128 = "128"


class Mode(str, enum.Enum):
    affine = "affine"
    mxfp4 = "mxfp4"


class Dtype(str, enum.Enum):
    # mlx_lm.convert.MODEL_CONVERSION_DTYPES
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def resolve_source(src: str) -> Path:
    """SRC as a local folder: a folder as is, a Hub id from `vmetal pull`'s models (pulling it first)."""
    from vmetal import hub
    from vmetal.cli.pull.view import TerminalView
    from vmetal.hub.common import HubError, looks_local

    path = Path(src).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or looks_local(src):
        raise VmetalError(f"source `{src}` is not a model folder (it does not exist or is a file)",
                          hint="pass a local Hugging Face model folder or a Hub id such as Qwen/Qwen3-0.6B",
                          exit_code=USAGE)
    # A complete pull is used as is (offline too); otherwise `vmetal pull`'s checks, progress and
    # resumability. The fit check is about serving the unquantized model, which is what converting avoids:
    # it only warns here (force).
    try:
        return hub.ensure_local(src, refresh=False, force=True, view=TerminalView(quiet=False))
    except HubError as exc:
        raise VmetalError(f"`{src}` is neither a local folder nor pulled, and pulling it failed: "
                          f"{exc.message}", hint=exc.hint, exit_code=exc.exit_code) from None


def check_source(folder: Path, config: dict[str, Any], group_size: int) -> None:
    """Refuse what mlx-lm would convert wrongly or only after loading every weight."""
    from vmetal.preflight.cache_types import check_model
    from vmetal.preflight.checkpoint import quantization_of

    where = str(folder / "config.json")
    check_model(config, where)  # UnsupportedModelError: exit 2, naming what no KV path holds
    done = quantization_of(config)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if done is not None or method:
        raise VmetalError(f"`{folder}` is already quantized ({done.describe() if done else method})",
                          hint="convert from the unquantized (float16/bfloat16/float32) checkpoint",
                          exit_code=USAGE)
    if not any(folder.glob("*.safetensors")):
        raise VmetalError(f"`{folder}` has no *.safetensors weights, which is what mlx-lm converts",
                          exit_code=USAGE)
    # mlx-lm quietly leaves a layer unquantized when the group size does not divide its input size,
    # which would give a "4-bit" model that is mostly full precision.
    heads = int(config.get("num_attention_heads") or 0)
    dims = {"hidden_size": config.get("hidden_size"), "intermediate_size": config.get("intermediate_size"),
            "num_attention_heads x head_dim": heads * int(config.get("head_dim") or 0) or None}
    bad = {name: int(v) for name, v in dims.items() if v and int(v) % group_size}
    if bad:
        name, value = next(iter(bad.items()))
        fits = [g for g in GROUP_SIZES if all(int(v) % g == 0 for v in dims.values() if v)]
        hint = (f"use `--group-size {fits[-1]}`" if fits
                else "mlx-lm cannot quantize this model with group size 32, 64 or 128")
        raise VmetalError(f"--group-size {group_size} does not divide the model's {name} ({value})",
                          hint=hint, exit_code=USAGE)


def _record_dtype(folder: Path, dtype: str) -> None:
    # mlx-lm casts the weights but keeps the source's dtype in config.json; vLLM and the fit
    # estimate read it from there.
    cfg_file = folder / "config.json"
    config = json.loads(cfg_file.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = dtype
    cfg_file.write_text(json.dumps(config, indent=4) + "\n")


def _install(built: Path, dst: Path, scratch: Path) -> None:
    """Put `built` at `dst`; an old `dst` moves into `scratch` first (deleted with it)."""
    if dst.is_dir() and any(dst.iterdir()):
        os.rename(dst, scratch / "previous")
    elif dst.is_dir():
        dst.rmdir()
    os.rename(built, dst)


def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", show_default=False,
                                       help="Unquantized model: a local folder or a Hugging Face id.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", show_default=False,
                                        help="Folder to write the quantized model to.")],
    bits: Annotated[Bits, typer.Option(help="Bits per weight.", show_default=False)],
    group_size: Annotated[GroupSize | None, typer.Option(
        help="Weights sharing one scale (and bias). Default: 64, 32 with --mode mxfp4.",
        show_default=False)] = None,
    mode: Annotated[Mode, typer.Option(help="affine (scale and bias per group) or mxfp4 (4 bits, "
                                            "group size 32).")] = Mode.affine,
    dtype: Annotated[Dtype | None, typer.Option(
        help="dtype of the weights left unquantized (norms, scales). Default: the source's.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST when it exists and is not empty.")]
    = False,
) -> None:
    """Quantize a model for MLX (mlx-lm's converter): DST serves with `vmetal serve DST`."""
    from vmetal.preflight.checkpoint import Quantization, read_config
    from vmetal.preflight.fit import weight_bytes_of

    n_bits = int(bits.value)
    if mode is Mode.mxfp4 and (n_bits != 4 or (group_size and int(group_size.value) != MXFP4_GROUP_SIZE)):
        raise VmetalError("--mode mxfp4 is 4 bits with group size 32",
                          hint="use `--bits 4` and no --group-size (or 32) with --mode mxfp4", exit_code=USAGE)
    group = int(group_size.value) if group_size else (MXFP4_GROUP_SIZE if mode is Mode.mxfp4 else 64)

    dst = dst.expanduser().absolute()
    if dst.exists() and not dst.is_dir():
        raise VmetalError(f"`{dst}` exists and is not a folder", hint="pick another DST", exit_code=USAGE)
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise VmetalError(f"`{dst}` exists and is not empty",
                          hint="pick another DST, or `--force` to replace it", exit_code=USAGE)

    source = resolve_source(src)
    if source == dst.resolve() or dst.resolve() in source.parents:
        raise VmetalError(f"DST `{dst}` would replace the source `{source}`", hint="pick another DST",
                          exit_code=USAGE)
    config = read_config(source)  # ModelNotFoundError / UnsupportedModelError: exit 2
    check_source(source, config, group)

    quant = Quantization(bits=n_bits, group_size=group, mode=mode.value)
    say(f"quantizing `{source}` to {quant.describe()} with mlx-lm")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        built = scratch / "model"
        from mlx_lm.convert import convert as mlx_convert

        # mlx-lm prints its progress with print(); the summary below says what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                mlx_convert(str(source), mlx_path=str(built), quantize=True, q_bits=n_bits,
                            q_group_size=group, q_mode=mode.value, dtype=dtype.value if dtype else None)
            except (ValueError, KeyError, FileNotFoundError) as exc:
                raise VmetalError(f"mlx-lm could not convert `{source}`: {exc}") from None
        if dtype is not None:
            _record_dtype(built, dtype.value)
        _install(built, dst, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    from vmetal.hub.common import human_size

    say(f"wrote `{dst}`: {quant.describe()}, weights {human_size(weight_bytes_of(dst))} "
         f"(from {human_size(weight_bytes_of(source))}); serve it with `vmetal serve {dst}`")
