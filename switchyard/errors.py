"""Switchyard's one error tree.

Every layer raises these and only these; lower-layer errors (vLLM, gRPC, Ray, pydantic) are
translated once, at the boundary where they enter (engine adapter, worker client, gateway
parser), with ``raise ... from exc``. Outgoing translation also happens once per boundary:
``http_status`` for the gateway and ``grpc_code`` for the servicers.

::

    SwitchyardError
    ├── RequestError            the client's fault (HTTP 4xx)
    │   ├── InvalidRequestError     malformed or out-of-range input (400)
    │   ├── ContextLengthError      prompt + max_tokens does not fit the model (400)
    │   ├── NotFoundError           the request names something that does not exist (404)
    │   │   └── ModelNotFoundError      unknown model name
    │   ├── RequestTooLargeError    body over the configured limit (413)
    │   ├── HeadersTooLargeError    request headers over the configured limit (431)
    │   ├── RequestTimeoutError     headers or body not received in time (408)
    │   ├── ConflictError           the request id is already in use (409)
    │   ├── AuthenticationError     missing or wrong API key or internal token (401)
    │   └── PermissionDeniedError   authenticated, but not the owner of that request (403)
    ├── CapacityError           no instance can take the request now; retryable (503)
    ├── EngineRequestError      one request failed, the instance is fine (500)
    ├── EngineDeadError         the instance is gone; its requests must move or fail (503)
    ├── MigrationError          a migration step failed; always recovered by recompute
    └── ConfigError             a configuration cannot work; raised at start-up
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CapacityError",
    "ConfigError",
    "ConflictError",
    "ContextLengthError",
    "EngineDeadError",
    "EngineRequestError",
    "HeadersTooLargeError",
    "InvalidRequestError",
    "MigrationError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "SwitchyardError",
    "grpc_code_name",
    "http_status",
]


class SwitchyardError(Exception):
    """Base of every error Switchyard raises on purpose."""

    #: OpenAI error ``type`` field used when this error reaches an HTTP client.
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field at fault, when there is one (OpenAI's ``param``).
        self.param = param


class RequestError(SwitchyardError):
    """The request itself is wrong; retrying it unchanged fails again."""

    error_type = "invalid_request_error"


class InvalidRequestError(RequestError):
    """Malformed JSON, a schema violation or an out-of-range value."""


class ContextLengthError(RequestError):
    """The prompt (plus the requested completion) exceeds the model's context."""


class NotFoundError(RequestError):
    """The request names something this deployment does not have (an instance, a model)."""

    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    """The request names a model this deployment does not serve."""


class RequestTooLargeError(RequestError):
    """The request body is over the configured size limit."""


class HeadersTooLargeError(RequestError):
    """The request's headers are over the configured size limit."""


class RequestTimeoutError(RequestError):
    """The client did not send its request's headers or body within the configured time."""


class ConflictError(RequestError):
    """The request names a request id that is already streaming (through this router, or on
    this worker); two requests under one id could not be told apart, nor aborted separately."""


class AuthenticationError(RequestError):
    """The gateway requires an API key, or an internal gRPC service the internal token, and the
    request has none or a wrong one."""

    error_type = "authentication_error"


class PermissionDeniedError(RequestError):
    """The caller is authenticated but may not act on that request: only the router that
    started a request on a worker may abort, suspend, snapshot or release it."""

    error_type = "permission_error"


class CapacityError(SwitchyardError):
    """No instance can take the request right now (none registered, all dead or full)."""

    error_type = "service_unavailable"


class EngineRequestError(SwitchyardError):
    """One request failed inside an engine; the engine keeps serving others."""


class EngineDeadError(SwitchyardError):
    """The engine instance cannot serve any more; its requests must move or fail."""

    error_type = "service_unavailable"


class MigrationError(SwitchyardError):
    """A migration step failed. Callers recover by recompute; clients never see it."""


class ConfigError(SwitchyardError):
    """A configuration value cannot work. Raised at start-up, with what to change."""


# One table per outgoing boundary, most specific class first (checked in order).
_HTTP_STATUS: tuple[tuple[type[SwitchyardError], int], ...] = (
    (NotFoundError, 404),
    (RequestTooLargeError, 413),
    (HeadersTooLargeError, 431),
    (RequestTimeoutError, 408),
    (ConflictError, 409),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (RequestError, 400),
    (CapacityError, 503),
    (EngineDeadError, 503),
    (SwitchyardError, 500),
)

_GRPC_CODE: tuple[tuple[type[SwitchyardError], str], ...] = (
    (NotFoundError, "NOT_FOUND"),
    (RequestTooLargeError, "RESOURCE_EXHAUSTED"),
    (ConflictError, "ALREADY_EXISTS"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (PermissionDeniedError, "PERMISSION_DENIED"),
    (RequestError, "INVALID_ARGUMENT"),
    (CapacityError, "UNAVAILABLE"),
    (EngineDeadError, "UNAVAILABLE"),
    (MigrationError, "FAILED_PRECONDITION"),  # a migration step refused; the request is fine
    (SwitchyardError, "INTERNAL"),
)


def http_status(exc: SwitchyardError) -> int:
    """HTTP status code for an error leaving the gateway."""
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def grpc_code_name(exc: SwitchyardError) -> str:
    """Name of the ``grpc.StatusCode`` for an error leaving a gRPC servicer.

    A name rather than the enum keeps this module free of a grpc import; the servicers
    resolve it with ``grpc.StatusCode[name]``.
    """
    for cls, code in _GRPC_CODE:
        if isinstance(exc, cls):
            return code
    return "INTERNAL"


# The reverse direction (a gRPC status received from a peer back into our tree) lives with
# the gRPC clients, since only they see grpc status codes.
GRPC_CODE_TO_ERROR: dict[str, type[SwitchyardError]] = {
    "NOT_FOUND": ModelNotFoundError,
    "RESOURCE_EXHAUSTED": RequestTooLargeError,
    "ALREADY_EXISTS": ConflictError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "INVALID_ARGUMENT": InvalidRequestError,
    "UNAVAILABLE": EngineDeadError,
    "FAILED_PRECONDITION": MigrationError,
    "INTERNAL": EngineRequestError,
}
