"""Requests the engine cannot honour are refused (HTTP 400), never half-served.

vLLM's OpenAI server answers 400 with the message only for its own client-error
types; any other exception raised while it processes a request becomes a 500
with an empty body. Hence a VLLMValidationError subclass (still a ValueError for
offline `LLM` callers), carrying the name of the field to change.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError


class UnsupportedRequestError(VLLMValidationError, ValueError):
    pass


def check_request(processed_inputs: Any, params: Any) -> None:
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams

    if isinstance(params, PoolingParams):
        # vLLM opens only the routes of the tasks the worker computes; an `LLM(...)` caller may still ask.
        if params.task not in (None, "embed"):
            raise UnsupportedRequestError(f"vmetal computes embeddings only: the pooling task `{params.task}` "
                                          "is not supported; use `embed`")
    elif not isinstance(params, SamplingParams):
        raise UnsupportedRequestError(f"vmetal cannot serve a request with {type(params).__name__}")
    inputs = processed_inputs if isinstance(processed_inputs, dict) else {}
    if inputs.get("prompt_embeds") is not None:
        raise UnsupportedRequestError("`prompt_embeds` is not supported by vmetal; send text or token ids")
    if inputs.get("mm_features") or inputs.get("multi_modal_data"):
        raise UnsupportedRequestError("multimodal inputs are not supported by vmetal; send text only")
