"""Internal credentials: the bearer token every internal gRPC service requires, and who calls.

Why a shared bearer token rather than mTLS: every process ``switchyard serve`` starts and
every pod the operator renders can be handed one secret value (a generated one, a file, an
environment variable, a Kubernetes Secret), while certificates need issuing, distribution to
Ray actors on other machines and rotation, machinery Switchyard does not have. The token
proves the caller was given the deployment's secret; it does not encrypt the channel (the
channels stay plaintext h2c), so confidentiality on the wire is the network's job
(docs/security.md says what that leaves open).

The servers check the token in one interceptor (``api.server``); the router's clients send it
with :class:`InternalCredentials`. A router also sends its own random id
(:data:`ROUTER_ID_KEY`), which a worker records as the owner of each request it starts, so that
another router holding the same token still cannot abort, suspend or migrate that request
(``workers/running.py``). The id is an identity among token holders, not a second secret: it
keeps routers (and clients choosing their own request ids) from acting on each other's
requests by mistake or by guessing an id, and is never published, but a token holder who
learns a router's id can claim it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from switchyard.config import check_internal_token, read_secret_file
from switchyard.errors import ConfigError

__all__ = [
    "AUTHORIZATION_KEY",
    "ROUTER_ID_KEY",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "InternalCredentials",
    "bearer_metadata",
    "caller_id",
    "generate_token",
    "new_router_id",
    "read_token_file",
]

AUTHORIZATION_KEY = "authorization"
"""Metadata key of the bearer token (HTTP's ``Authorization``, lower case as gRPC requires)."""

ROUTER_ID_KEY = "x-switchyard-router-id"
"""Metadata key of the calling router's id: the owner of the requests it starts on a worker."""

MAX_ROUTER_ID_CHARS = 128
"""Longest router id a worker records (generated ids have 32)."""

TOKEN_ENV = "SWITCHYARD_INTERNAL_TOKEN"
"""Environment variable ``switchyard serve`` reads the internal token from (router pods get it
from a Secret this way); a flag would show the token in ``ps``."""

TOKEN_FILE_ENV = "SWITCHYARD_INTERNAL_TOKEN_FILE"
"""Environment variable naming a file that holds the internal token (a mounted Secret)."""


def generate_token() -> SecretStr:
    """A fresh random token (256 bits, URL-safe base64) for a deployment that was given none."""
    return SecretStr(secrets.token_urlsafe(32))


def new_router_id() -> str:
    """A fresh router id (128 random bits, hex): one per router process, never published."""
    return secrets.token_hex(16)


def read_token_file(path: Path) -> SecretStr:
    """The token stored in ``path`` (a mounted Secret), surrounding whitespace dropped.

    Raises ``ConfigError`` naming the file, never its content.
    """
    text = read_secret_file(path, "internal token")
    try:
        return SecretStr(check_internal_token(text.strip()))
    except ValueError as exc:
        raise ConfigError(f"internal token file {path}: {exc}") from exc


def bearer_metadata(token: SecretStr | None) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call with ``token`` (none for None)."""
    if token is None:
        return ()
    return ((AUTHORIZATION_KEY, "Bearer " + token.get_secret_value()),)


def caller_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The router id a call carries (:data:`ROUTER_ID_KEY`), or ``""`` for a caller that sends none.

    Meaningful behind the token check only: the id tells token holders apart. An over-long
    value is cut to :data:`MAX_ROUTER_ID_CHARS` characters.
    """
    for key, value in metadata or ():
        if key == ROUTER_ID_KEY:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            return text[:MAX_ROUTER_ID_CHARS]
    return ""


@dataclass(frozen=True, slots=True)
class InternalCredentials:
    """What a router sends on every call to a worker: the deployment's token and its own id.

    The dataclass ``repr`` shows the token as ``SecretStr``'s stars, so logging a client never
    leaks it.
    """

    token: SecretStr | None = None
    """The internal token; None sends none (a worker that requires one refuses the call)."""

    router_id: str = ""
    """This router's id; workers record it as the owner of the requests it starts ("" sends none)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying both (computed once per client, sent with every call)."""
        own = ((ROUTER_ID_KEY, self.router_id),) if self.router_id else ()
        return bearer_metadata(self.token) + own
