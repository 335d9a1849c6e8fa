"""Operator endpoints of the gateway: ``POST /admin/drain`` and ``POST /admin/undrain``.

Why on the gateway: it is the router's one HTTP surface, already authenticated (the same
bearer keys as the API; these routes are never exempt), and the router core behind it is
the one that owns the streams a drain must move. The operator and ``switchyard drain``
call it before removing an instance.

Bodies are small JSON objects validated by pydantic (400 on anything else); an instance the
router does not know is a 404; the drain's result comes back as JSON once it is over
(``router/drain.py``), so the call takes up to ``timeout_s``.
"""

from __future__ import annotations

import json
from typing import Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from switchyard.errors import InvalidRequestError, NotFoundError
from switchyard.router.drain import DrainResult

__all__ = ["DrainableCore", "drain", "undrain"]

_M = TypeVar("_M", bound=BaseModel)


@runtime_checkable
class DrainableCore(Protocol):
    """What the admin endpoints need of the router core (``RouterCore`` has it)."""

    async def drain(self, instance_id: str, *, timeout_s: float = ...) -> DrainResult: ...

    def undrain(self, instance_id: str) -> bool: ...


class _UndrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: str = Field(min_length=1)
    """The instance id (as in the membership)."""


class _DrainBody(_UndrainBody):
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long to keep moving and waiting before reporting what is left as failed."""


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise InvalidRequestError(f"invalid body: {where}: {err['msg']}", param=where) from None


def _not_found(instance: str) -> NotFoundError:
    return NotFoundError(f"instance {instance!r} is not a member of this router", param="instance")


def _core(core: object) -> DrainableCore:
    if not isinstance(core, DrainableCore):
        raise InvalidRequestError("this router core cannot drain instances")
    return core


async def drain(core: object, body: bytes) -> Response:
    """``POST /admin/drain {"instance": ..., "timeout_s": 60}`` -> the drain's result."""
    req = _parse(_DrainBody, body)
    try:
        result = await _core(core).drain(req.instance, timeout_s=req.timeout_s)
    except KeyError:
        raise _not_found(req.instance) from None
    return Response(json.dumps(result.as_dict()), media_type="application/json")


async def undrain(core: object, body: bytes) -> Response:
    """``POST /admin/undrain {"instance": ...}``: route to the instance again."""
    req = _parse(_UndrainBody, body)
    if not _core(core).undrain(req.instance):
        raise _not_found(req.instance)
    return JSONResponse({"instance": req.instance, "draining": False})
