"""`vmetal serve --speculative ngram|DRAFT [--speculative-tokens K]`: vLLM's `--speculative-config` without its JSON.

`ngram` is prompt lookup; anything else names a draft model (a local folder or a Hub id, pulled like the model
itself), which must be a smaller model of the target's family: it is checked against the target before anything
starts (its cache must roll back, its vocabulary must be the target's), as the engine would check it ~10 s later.
"""

from __future__ import annotations

import json
from pathlib import Path

from vmetal.cli import options
from vmetal.errors import USAGE, VmetalError
from vmetal.preflight import features


def speculation_args(choice: str | None, tokens: int | None, vllm_args: list[str]) -> list[str]:
    """The vLLM arguments `--speculative`/`--speculative-tokens` stand for (none without them); a draft model as
    given, for `resolve_draft` to turn into the folder the engine loads."""
    if choice is None:
        if tokens is not None:
            raise VmetalError("`--speculative-tokens` goes with `--speculative ngram|DRAFT_MODEL`", exit_code=USAGE)
        return []
    if not choice.strip():
        raise VmetalError("`--speculative` is empty", hint="give `ngram` or a draft model (a folder or a Hub id)",
                          exit_code=USAGE)
    if features.asks_speculation(vllm_args):
        raise VmetalError(f"give `--speculative` or `{features.SPECULATIVE}` after `--`, not both", exit_code=USAGE)
    if choice == features.NGRAM:
        return features.ngram_args(tokens)
    return [features.SPECULATIVE, json.dumps(features.draft_config(choice, tokens))]


def resolve_draft(vllm_args: list[str], max_model_len: int | None, no_pull: bool) -> str | None:
    """The local folder of the draft model `speculation_args` named (pulled from the Hub first unless `no_pull`),
    written back into `vllm_args`; None without one. A missing folder is refused (exit 2)."""
    from vmetal.hub.common import looks_local

    at = vllm_args.index(features.SPECULATIVE) if features.SPECULATIVE in vllm_args else -1
    if at < 0:
        return None
    config = json.loads(vllm_args[at + 1])
    if config.get("method") != features.DRAFT_MODEL:
        return None
    draft = config["model"]
    path = Path(draft).expanduser()
    if path.exists():
        draft = str(path.resolve())  # the server does not depend on its working directory
    elif looks_local(draft):
        raise VmetalError(f"draft model folder `{draft}` does not exist",
                          hint="pass an existing folder or a Hugging Face id to `--speculative`", exit_code=USAGE)
    elif not no_pull:
        draft = options.pulled(draft, max_model_len, "mlx")
    vllm_args[at + 1] = json.dumps({**config, "model": draft})
    return draft


def check_draft(target: str, draft: str) -> None:
    """A local draft that cannot draft for the local `target`: exit 2 with one line (a damaged file, a cache that
    cannot roll back, or another vocabulary: `features.check_draft`, which the engine asks too)."""
    from vmetal.preflight.checkpoint import read_config
    from vmetal.preflight.model_files import check_folder

    folder = Path(draft)
    if not (folder / "config.json").is_file():
        return  # a Hub id left to vLLM (--no-pull): the engine checks it once resolved
    check_folder(folder)
    features.check_draft(read_config(Path(target)), read_config(folder), str(folder / "config.json"), draft)
