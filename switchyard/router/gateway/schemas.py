"""OpenAI request models, and the parser that turns a body into one.

Requests are strict: wrong types are not coerced (``"max_tokens": "16"`` is a 400, not 16),
out-of-range values are rejected here with the field path, and so are **unknown fields**: a
client that sends ``tools`` or ``response_format`` to a gateway that ignores them would get
silently wrong output, which is worse than a 400 naming the field. The exception is
:data:`IGNORED_FIELDS`, OpenAI fields that cannot change the generated text (bookkeeping such
as ``metadata`` or ``store``); those are accepted and dropped. Fields OpenAI defines that we do
not implement (``n > 1``, ``logprobs``, ``echo``, ``best_of > 1``, ``suffix``) are modelled so
that their "off" values (null, false, 1) pass and anything else gets a 400 that says it is
unsupported. Every sampling field accepts ``null`` as "use the default", as OpenAI does.

Responses are built in ``responses.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic import model_validator as _model_validator
from pydantic_core import PydanticCustomError

from switchyard.errors import ContextLengthError, InvalidRequestError
from switchyard.messages import SamplingOptions

__all__ = [
    "IGNORED_FIELDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "parse_request",
]

#: OpenAI fields accepted and ignored: none of them changes what is generated.
IGNORED_FIELDS = frozenset(
    {"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"}
)

_INT64 = 2**63


def _unsupported(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", "{what} is not supported by this gateway", {"what": what})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    """OpenAI's ``stream_options``."""

    include_usage: bool | None = None
    """Send a last chunk with ``usage`` (and ``"usage": null`` on the others)."""


class _GenerationRequest(_Strict):
    """Fields shared by completions and chat completions."""

    prompt_param: ClassVar[str] = "prompt"
    """The field a prompt-length error points at."""
    default_max_tokens: ClassVar[int | None] = None
    """``max_tokens`` when unset: None means all the room the context leaves."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None
    """One stop string or a list; normalised to a list."""
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    user: str | None = None

    @_model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and not IGNORED_FIELDS.isdisjoint(data):
            return {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
        return data

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise PydanticCustomError("unsupported", "n > 1 is not supported; send n separate requests")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, v: Any, info: ValidationInfo) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if not stops:
            return None
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise PydanticCustomError("stop", "stop must be a string or a list of strings")
        if not all(stops):
            raise PydanticCustomError("empty_stop", "stop strings must not be empty")
        limit = (info.context or {}).get("max_stop_strings")
        if limit is not None and len(stops) > limit:
            msg = "at most {limit} stop strings are allowed, got {n}"
            raise PydanticCustomError("too_many_stops", msg, {"limit": limit, "n": len(stops)})
        return stops

    @_model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list (the validator normalised ``stop`` to one)."""
        return list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        """The completion budget the client asked for, None when it left it to us."""
        return self.max_tokens

    def _max_tokens(self, prompt_len: int, context: int) -> int:
        room = context - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len} tokens, leaving no room for a completion; shorten the prompt",
                param=self.prompt_param,
            )
        asked = self.requested_max_tokens
        if asked is None:
            return room if self.default_max_tokens is None else min(self.default_max_tokens, room)
        if asked > room:
            field = "max_tokens" if asked == self.max_tokens else "max_completion_tokens"
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens, but {prompt_len + asked} were "
                f"requested ({prompt_len} in the prompt, {asked} for the completion); "
                f"reduce the prompt or {field}",
                param=field,
            )
        return asked

    def sampling_options(self, prompt_len: int, context: int) -> SamplingOptions:
        """The engine's sampling parameters, defaults filled in and ``max_tokens`` fitted.

        Raises :class:`ContextLengthError` when the prompt leaves no room in ``context`` or an
        explicit ``max_tokens`` does not fit (never clamped: the client asked for it).
        """
        max_tokens = self._max_tokens(prompt_len, context)
        min_tokens = self.min_tokens or 0
        if min_tokens > max_tokens:
            msg = f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})"
            raise InvalidRequestError(msg, param="min_tokens")
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),  # OpenAI-style -1 and 0 both disable top-k
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
            min_tokens=min_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
        )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or token IDs."""

    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's legacy-completions default

    prompt: str | list[int]
    """Text, token IDs, or a one-element list of text (OpenAI's batch form with one prompt)."""

    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if len(v) != 1:
                raise PydanticCustomError("prompt", "batched prompts are not supported; send one per request")
            return v[0]
        if isinstance(v, list) and v and all(type(x) is int for x in v):  # not bool; fast for long lists
            return v
        raise PydanticCustomError("prompt", "prompt must be a string, a non-empty token ID list or [string]")

    @field_validator("echo", "logprobs", "best_of", "suffix")
    @classmethod
    def _off_values_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v is False or (info.field_name == "best_of" and v == 1):
            return v
        raise _unsupported(str(info.field_name))


_Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(_Strict):
    """One chat message; text content only (a string or a list of text parts)."""

    role: _Role
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise PydanticCustomError("content", "content must be a string or a list of text parts")
        texts = []
        for part in v:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise PydanticCustomError("content", "only text content parts are supported")
            texts.append(text)
        return "\n".join(texts)

    def for_template(self) -> dict[str, str]:
        """The dict a chat template sees; ``developer`` is OpenAI's new name for ``system``."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    prompt_param: ClassVar[str] = "messages"

    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    """``fail_fast``: the first bad message ends validation. Without it a body of 20,000 empty
    objects costs 40,000 error records, 0.2 s of CPU for a 64 KiB body (measured)."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, v: Any, info: ValidationInfo) -> Any:
        """At most the context's ``max_chat_messages`` messages, counted before any is validated."""
        limit = (info.context or {}).get("max_chat_messages")
        if limit is not None and isinstance(v, list) and len(v) > limit:
            msg = "at most {limit} messages are allowed, got {n}"
            raise PydanticCustomError("too_many_messages", msg, {"limit": limit, "n": len(v)})
        return v

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None or v is False:
            return v
        raise _unsupported(str(info.field_name))

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_R = TypeVar("_R", bound=_GenerationRequest)


def parse_request(
    model: type[_R], body: bytes, *, max_stop_strings: int, max_chat_messages: int | None = None
) -> _R:
    """Validate a request body; every failure becomes one :class:`InvalidRequestError`.

    This is the gateway's translation point for pydantic errors: the message names the field
    path (``messages.0.content``) so a client can find its mistake. ``max_chat_messages``
    (None: no limit) bounds a chat's messages.
    """
    limits = {"max_stop_strings": max_stop_strings, "max_chat_messages": max_chat_messages}
    try:
        return model.model_validate_json(body, context=limits)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise InvalidRequestError(f"malformed JSON body: {first['msg']}") from exc
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidRequestError("the request body must be a JSON object") from exc
        unknown = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            raise InvalidRequestError(
                f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0]
            ) from exc
        path = ".".join(map(str, first["loc"]))
        if first["type"] == "missing":
            raise InvalidRequestError(f"missing required parameter: '{path}'", param=path) from exc
        where = f"invalid value for '{path}': " if path else ""
        raise InvalidRequestError(f"{where}{first['msg']}", param=path or None) from exc
