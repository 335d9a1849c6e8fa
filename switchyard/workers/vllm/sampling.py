"""Our sampling options as vLLM's ``SamplingParams``: the one place the two shapes meet.

The engine adapter and the migration steps (shadow pulls, admissions) both build vLLM
requests, so the conversion sits beside them rather than inside either.
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from switchyard.messages import SamplingOptions
from switchyard.workers.vllm.kv_connector import REQUEST_ID_ARG

__all__ = ["sampling_params"]


def sampling_params(
    opts: SamplingOptions, request_id: str, kv_params: dict[str, Any] | None = None
) -> SamplingParams:
    """Our sampling options as vLLM's, tagged with our request id for the connector."""
    extra: dict[str, Any] = {REQUEST_ID_ARG: request_id}
    if kv_params:
        extra["kv_transfer_params"] = kv_params
    return SamplingParams(
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        seed=opts.seed,
        ignore_eos=opts.ignore_eos,
        stop_token_ids=list(opts.stop_token_ids),
        min_tokens=opts.min_tokens,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        repetition_penalty=opts.repetition_penalty,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra,
    )
