"""``streaming.error_payload``: the gateway's one builder of OpenAI error bodies.

Pinned per error class (status, ``type`` and ``code``), plus the paths that used to build
their own body: Starlette's 404/405 and the admin endpoints' unknown instance. The same body
goes out as a JSON response and as an SSE error event.
"""

from __future__ import annotations

import json
import logging

import pytest
from starlette.exceptions import HTTPException

from switchyard.errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    ConflictError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    HeadersTooLargeError,
    InvalidRequestError,
    MigrationError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeoutError,
    RequestTooLargeError,
    SwitchyardError,
)
from switchyard.router.gateway.streaming import error_event, error_payload, error_response

# (error, HTTP status, OpenAI type, OpenAI code): what each class has always produced.
CASES: list[tuple[SwitchyardError, int, str, str | None]] = [
    (InvalidRequestError("bad", param="temperature"), 400, "invalid_request_error", None),
    (
        ContextLengthError("too long", param="max_tokens"),
        400,
        "invalid_request_error",
        "context_length_exceeded",
    ),
    (ModelNotFoundError("no model", param="model"), 404, "not_found_error", "model_not_found"),
    (NotFoundError("no instance", param="instance"), 404, "not_found_error", None),
    (RequestTooLargeError("too big"), 413, "invalid_request_error", "request_too_large"),
    (
        ConflictError("request id 'x' is already streaming", param="request_id"),
        409,
        "invalid_request_error",
        None,
    ),
    (
        HeadersTooLargeError("headers too big"),
        431,
        "invalid_request_error",
        "request_header_fields_too_large",
    ),
    (RequestTimeoutError("too slow"), 408, "invalid_request_error", "request_timeout"),
    (AuthenticationError("no key"), 401, "authentication_error", "invalid_api_key"),
    (PermissionDeniedError("not yours"), 403, "permission_error", None),
    (CapacityError("busy"), 503, "service_unavailable", "capacity_exceeded"),
    (EngineDeadError("gone"), 503, "service_unavailable", "engine_unavailable"),
    (EngineRequestError("failed"), 500, "internal_error", None),
    (MigrationError("refused"), 500, "internal_error", None),
    (ConfigError("misconfigured"), 500, "internal_error", None),
]


@pytest.mark.parametrize(("exc", "status", "type_", "code"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_class_keeps_its_status_type_code_message_and_param(
    exc: SwitchyardError, status: int, type_: str, code: str | None
) -> None:
    body = {"error": {"message": exc.message, "type": type_, "param": exc.param, "code": code}}
    assert error_payload(exc) == (status, body)
    response = error_response(exc)
    assert response.status_code == status and json.loads(bytes(response.body)) == body
    assert (response.headers.get("www-authenticate") == "Bearer") == (status == 401)
    # a 408 or 413 may leave the body unread: the connection closes after it
    assert (response.headers.get("connection") == "close") == (status in (408, 413))
    event = error_event(exc)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event.removeprefix(b"data: ")) == body


@pytest.mark.parametrize(("status", "detail"), [(404, "Not Found"), (405, "Method Not Allowed")])
def test_starlettes_own_errors_keep_their_status(status: int, detail: str) -> None:
    body = {"error": {"message": detail, "type": "invalid_request_error", "param": None, "code": None}}
    assert error_payload(HTTPException(status)) == (status, body)


def test_an_unexpected_exception_is_a_logged_500_that_hides_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    status, body = error_payload(KeyError("/secret/path"))
    assert status == 500
    assert body == {
        "error": {"message": "internal server error", "type": "internal_error", "param": None, "code": None}
    }
    assert "/secret/path" not in json.dumps(body)
    assert [r.getMessage() for r in caplog.records] == ["unexpected error in the gateway"]
