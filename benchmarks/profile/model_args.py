"""What the profile scripts share about their model: the `--shape`, `--dtype` and `--model-dir` arguments, and
the checkpoint they name (built once, reused by later runs that pass the same `--model-dir`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_model_args(parser: argparse.ArgumentParser, shape: str) -> None:
    from vmetal.bench.shapes import SHAPES

    parser.add_argument("--shape", default=shape, choices=sorted(SHAPES), help=f"model shape (default {shape})")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the checkpoint is built (reused when it is of this shape and dtype)")


def model_dir(args: argparse.Namespace, prefix: str) -> Path:
    """The checkpoint `args` name: `--model-dir` (built there unless it already holds this shape), else a new
    temporary folder."""
    from vmetal.bench.shapes import SHAPES, build_model

    return build_model(args.model_dir or Path(tempfile.mkdtemp(prefix=prefix)), args.dtype, SHAPES[args.shape])
