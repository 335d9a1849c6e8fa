"""The one table from vLLM's exceptions and finish reasons to Switchyard's (vLLM 0.32.0).

The engine adapter (``engine.py``) is the only boundary where these vLLM types enter, and it
translates through this table only.
"""

from __future__ import annotations

from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError

from switchyard.errors import (
    CapacityError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    SwitchyardError,
)
from switchyard.messages import FinishReason

__all__ = ["finish_reason", "translate_vllm_error"]

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "repetition": FinishReason.STOP,  # vLLM's hallucination guard stopped it: a normal stop
}


def translate_vllm_error(
    exc: BaseException, *, prompt_len: int, max_model_len: int, admitted: bool
) -> SwitchyardError:
    """The one table from vLLM's exceptions to Switchyard's (vLLM 0.32.0 classes).

    ``admitted`` is False until the request produced its first output: before that a plain
    ``ValueError``/``TypeError`` is vLLM rejecting the input (``AsyncLLM.generate`` wraps
    those in ``EngineGenerateError``); afterwards it is an engine fault.
    """
    if isinstance(exc, SwitchyardError):
        return exc
    if isinstance(exc, VLLMEngineDeadError):
        return EngineDeadError(f"the vLLM engine core died: {exc}")
    if isinstance(exc, GracefulHTTPError):  # admission limits (queue length, queued tokens)
        return CapacityError(f"the engine refused the request for now: {exc}")
    cause = exc.__cause__ if isinstance(exc, EngineGenerateError) and exc.__cause__ else exc
    rejected = isinstance(cause, VLLMClientError) or (
        not admitted and isinstance(cause, ValueError | TypeError)
    )
    if rejected and prompt_len >= max_model_len:
        return ContextLengthError(
            f"the prompt has {prompt_len} tokens but max_model_len is {max_model_len}, "
            f"which must also leave room for at least one generated token ({cause})",
            param="prompt",
        )
    if rejected:
        return InvalidRequestError(str(cause))
    return EngineRequestError(f"the request failed in vLLM: {type(exc).__name__}: {exc}")


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason string as ours; ``error`` (a retryable engine fault) raises."""
    if reason is not None and (mapped := _FINISH_REASONS.get(reason)) is not None:
        return mapped
    raise EngineRequestError(f"vLLM finished the request with reason {reason!r}")
