"""`--api-key` for every endpoint of the server but `/health`.

vLLM 0.32's own `AuthenticationMiddleware` checks the key only under `/v1`, `/v2`, `/inference` and `/cohere`.
Everything else stays open to anyone who can reach the port: `/invocations` (SageMaker's entry, which runs
completions and chat), `/tokenize`, `/detokenize`, `/pooling`, `/score`, `/rerank`, `/classify`, `/metrics`,
`/load`, `/version`, `/ping`, the OpenAPI docs. `vmetal serve --api-key K` means "clients need K", so
`ServerProcess` adds this class through vLLM's own `--middleware` flag whenever a key is set: vLLM's
check stays as it is, and this one, outside it, guards the rest the same way (the same Bearer check,
reused from vLLM's class). `/health` stays open for load balancers and `vmetal serve`'s readiness poll;
CORS preflights (`OPTIONS`) pass, as in vLLM.

The keys come from the environment `ServerProcess` gives the server: `VMETAL_API_KEYS` (newline-separated,
the `--api-key` values passed to vLLM after `--`, which vLLM prefers) else `VLLM_API_KEY`, the same
precedence as vLLM's. This module is imported only inside the server process (vLLM imports it by name).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

KEYS_ENV = "VMETAL_API_KEYS"
OPEN_PATHS = frozenset({"/health"})
QUALNAME = "vmetal.server.api_auth.ApiKeyEverywhere"


def configured_keys(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    passed = [k for k in (env.get(KEYS_ENV) or "").split("\n") if k]
    return passed or [k for k in [env.get("VLLM_API_KEY", "")] if k]


class ApiKeyEverywhere(AuthenticationMiddleware):
    def __init__(self, app: ASGIApp) -> None:
        keys = configured_keys()
        if not keys:
            # Added only when a key is set; without one, guarding would lock every client out.
            raise RuntimeError(f"{QUALNAME} was added but neither {KEYS_ENV} nor VLLM_API_KEY is set")
        super().__init__(app, keys)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path.rstrip("/") not in OPEN_PATHS and not self.verify_token(_headers(scope)):
            return JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        return self.app(scope, receive, send)


def _headers(scope: Scope):  # noqa: ANN202 - starlette's Headers
    from starlette.datastructures import Headers

    return Headers(scope=scope)
