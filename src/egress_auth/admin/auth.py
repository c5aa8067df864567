"""The admin bearer token: from EGRESS_AUTH_ADMIN_TOKEN, or generated into the data dir."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "EGRESS_AUTH_ADMIN_TOKEN"


class AdminTokenError(Exception):
    """A one-line reason the admin token cannot be had."""


def load_admin_token(data_dir: Path, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV]
    path = data_dir / "admin-token"
    try:
        token = path.read_text().strip()
        if token:
            if path.stat().st_mode & 0o077:
                raise AdminTokenError(f"{path} is readable by others: chmod 600 it")
            return token
    except FileNotFoundError:
        pass
    except OSError as e:
        raise AdminTokenError(f"cannot read {path}: {e.strerror}") from None
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison: the time taken says nothing about how much matched."""
    return hmac.compare_digest(given.encode(), expected.encode())
