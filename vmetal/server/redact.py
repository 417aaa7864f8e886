"""Secrets out of everything vmetal prints: `doctor`'s report, error lines, the server's echoed log.

A secret is the value of a variable named like a credential (`HF_TOKEN`, `VLLM_API_KEY`, `*_TOKEN`,
`*_KEY`, `*SECRET*`, `*PASSWORD*`), the user:password of a URL in the environment (`HF_ENDPOINT`,
`HTTPS_PROXY`), and any key handed to the server (`--api-key`). Stdlib only: imported on every start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY", "MODELSCOPE_API_TOKEN",
                    "OPENAI_API_KEY")
# Names like these hold credentials (TOKENIZERS_PARALLELISM does not end like them).
_SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD", "_PASSWD", "_CREDENTIALS", "_KEYS")
_NOT_SECRETS = ("true", "false", "none", "null", "unset")
MASK = "****"


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return (upper in SECRET_VARIABLES or upper.endswith(_SECRET_SUFFIXES)
            or "SECRET" in upper or "PASSWORD" in upper)


def secret_values(environ: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The strings to mask, longest first (so a secret that contains another is masked whole)."""
    env = os.environ if environ is None else environ
    # Short or boolean values are switches, not secrets, and masking them would garble the output.
    # Stripped: a value read from a CRLF `.env` file or pasted with spaces is printed without them.
    values = {part.strip() for k, v in env.items() if is_secret_name(k)
              for part in v.split("\n") if len(part.strip()) >= 4 and part.strip().lower() not in _NOT_SECRETS}
    values.update(s.strip() for s in extra if s and len(s.strip()) >= 4)
    # Credentials inside URLs (HF_ENDPOINT, HTTPS_PROXY, …): the user:password pair and the password, or a
    # token given as the user alone (`https://TOKEN@host`).
    for value in env.values():
        userinfo = _userinfo(value.strip())
        if userinfo:
            values.update(p for p in (userinfo, userinfo.split(":", 1)[-1]) if len(p) >= 4)
    return sorted(values, key=len, reverse=True)


def _authority_end(rest: str) -> int:
    """Where a URL's authority (after `scheme://`) ends: at the first `/`, `?` or `#`."""
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    return min(ends, default=len(rest))


def _userinfo(url: str) -> str | None:
    """The userinfo of `url` (what comes before the host's `@`), or None."""
    if "://" not in url:
        return None
    rest = url.split("://", 1)[1]
    authority = rest[: _authority_end(rest)]
    return authority.rsplit("@", 1)[0] if "@" in authority else None


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
        escaped = json.dumps(secret)[1:-1]
        if escaped != secret:
            text = text.replace(escaped, MASK)
    return text


def url_without_credentials(url: str) -> str:
    if _userinfo(url) is None:
        return url
    scheme, rest = url.split("://", 1)
    end = _authority_end(rest)
    return f"{scheme}://{MASK}@{rest[:end].rsplit('@', 1)[1]}{rest[end:]}"
