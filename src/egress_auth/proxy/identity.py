"""Proxy-Authorization -> sandbox id. Pure: takes the header and the snapshot's identities.

Clients send `Proxy-Authorization: Basic base64(sandboxId:token)`, which is what curl,
requests, pip, git and Node send for `HTTPS_PROXY=http://ID:TOKEN@host:port`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SANDBOX = "default"


def token_hash(token: str) -> bytes:
    # Tokens are 32 random bytes: a plain SHA-256 is as strong as a slow hash here, and
    # checking it costs microseconds per connection.
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Identity:
    sandbox: str
    token_hash: bytes | None  # None for the sandbox-less `default`


class Unauthenticated(Exception):
    """Credentials missing (while required), malformed, wrong or revoked. Carries no secret."""


def _parse(header: str) -> tuple[str, str]:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("Proxy-Authorization must use the Basic scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("Proxy-Authorization is not valid base64") from None
    sandbox, sep, token = decoded.partition(":")
    if not sep or not sandbox or not token:
        raise Unauthenticated("Proxy-Authorization must be sandboxId:token")
    return sandbox, token


def identify(header: str | None, identities: Mapping[str, bytes], *, required: bool) -> Identity:
    """Who is asking. Wrong or revoked credentials are refused in both modes."""
    if not header:
        if required:
            raise Unauthenticated("proxy credentials are required")
        return Identity(DEFAULT_SANDBOX, None)
    sandbox, token = _parse(header)
    expected = identities.get(sandbox)
    given = token_hash(token)
    # Compare even for an unknown id, so the time taken does not tell ids apart.
    ok = hmac.compare_digest(given, expected or b"\0" * 32) and expected is not None
    if not ok:
        raise Unauthenticated("unknown sandbox or wrong token")
    return Identity(sandbox, expected)


def still_valid(identity: Identity, identities: Mapping[str, bytes], *, required: bool) -> bool:
    """For each request on an open connection: the sandbox exists with the same token."""
    if identity.token_hash is None:
        return not required
    current = identities.get(identity.sandbox)
    return current is not None and hmac.compare_digest(current, identity.token_hash)
