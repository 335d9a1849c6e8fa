"""Internal credentials: the bearer token every internal gRPC service requires, and who calls.

Why a shared bearer token rather than mTLS: every process ``switchyard serve`` starts and
every pod the operator renders can be handed one secret value (a generated one, a file, an
environment variable, a Kubernetes Secret), while certificates need issuing, distribution to
Ray actors on other machines and rotation, machinery Switchyard does not have. The token
proves the caller was given the deployment's secret; it does not encrypt the channel (the
channels stay plaintext h2c), so confidentiality on the wire is the network's job
(docs/security.md says what that leaves open).

The servers check the token in one interceptor (``api.server``); the router's clients send it
with :class:`InternalCredentials`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from switchyard.config import check_internal_token
from switchyard.errors import ConfigError

__all__ = [
    "AUTHORIZATION_KEY",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "InternalCredentials",
    "bearer_metadata",
    "generate_token",
    "read_token_file",
]

AUTHORIZATION_KEY = "authorization"
"""Metadata key of the bearer token (HTTP's ``Authorization``, lower case as gRPC requires)."""

TOKEN_ENV = "SWITCHYARD_INTERNAL_TOKEN"
"""Environment variable ``switchyard serve`` reads the internal token from (router pods get it
from a Secret this way); a flag would show the token in ``ps``."""

TOKEN_FILE_ENV = "SWITCHYARD_INTERNAL_TOKEN_FILE"
"""Environment variable naming a file that holds the internal token (a mounted Secret)."""


def generate_token() -> SecretStr:
    """A fresh random token (256 bits, URL-safe base64) for a deployment that was given none."""
    return SecretStr(secrets.token_urlsafe(32))


def read_token_file(path: Path) -> SecretStr:
    """The token stored in ``path`` (a mounted Secret), surrounding whitespace dropped.

    Raises ``ConfigError`` naming the file, never its content.
    """
    try:
        text = path.expanduser().read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ConfigError(f"cannot read the internal token file {path}: {reason}") from exc
    try:
        return SecretStr(check_internal_token(text.strip()))
    except ValueError as exc:
        raise ConfigError(f"internal token file {path}: {exc}") from exc


def bearer_metadata(token: SecretStr | None) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a call with ``token`` (none for None)."""
    if token is None:
        return ()
    return ((AUTHORIZATION_KEY, "Bearer " + token.get_secret_value()),)


@dataclass(frozen=True, slots=True)
class InternalCredentials:
    """What a router sends on every call to a worker: the deployment's token.

    The dataclass ``repr`` shows the token as ``SecretStr``'s stars, so logging a client never
    leaks it.
    """

    token: SecretStr | None = None
    """The internal token; None sends none (a worker that requires one refuses the call)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying them (computed once per client, sent with every call)."""
        return bearer_metadata(self.token)
