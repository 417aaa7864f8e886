"""Requests the engine cannot honour are refused (HTTP 400), never half-served.

vLLM's OpenAI server turns a ValueError raised while it processes a request
into a 400 whose message is this text, so each names the field to change.
"""

from __future__ import annotations

from typing import Any


class UnsupportedRequestError(ValueError):
    pass


def check_request(processed_inputs: Any, params: Any) -> None:
    from vllm.sampling_params import SamplingParams

    if not isinstance(params, SamplingParams):
        raise UnsupportedRequestError("vmetal serves text generation only: pooling/embedding requests are not supported")
    if params.prompt_logprobs is not None:
        raise UnsupportedRequestError(
            "`prompt_logprobs` (and `echo` with logprobs) is not supported by vmetal; remove it from the request"
        )
    if params.structured_outputs is not None:
        raise UnsupportedRequestError(
            "structured output (`response_format`, `guided_*`, `structured_outputs`) is not supported by vmetal yet; "
            "remove it from the request"
        )
    inputs = processed_inputs if isinstance(processed_inputs, dict) else {}
    if inputs.get("prompt_embeds") is not None:
        raise UnsupportedRequestError("`prompt_embeds` is not supported by vmetal; send text or token ids")
    if inputs.get("mm_features") or inputs.get("multi_modal_data"):
        raise UnsupportedRequestError("multimodal inputs are not supported by vmetal; send text only")
