"""Templates and sandboxes in the store: policy documents (not secret) and token hashes.

A sandbox's proxy token is never stored, only its SHA-256: tokens are 32 random bytes, so a
fast hash is enough (there is nothing to brute-force), and it is compared in constant time.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from .timestamps import parse_ts, ts


class StoreConflict(Exception):
    """The name or id is taken."""


@dataclass(frozen=True)
class TemplateRow:
    name: str
    body: str  # the template as JSON (camelCase wire form)
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SandboxRow:
    id: str
    template: str
    network: str | None  # the sandbox's own overrides as JSON
    token_hash: bytes
    created_at: datetime
    updated_at: datetime


class _Conn(Protocol):
    def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...
    def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...


def _template(r: tuple[object, ...]) -> TemplateRow:
    return TemplateRow(str(r[0]), str(r[1]), parse_ts(str(r[2])), parse_ts(str(r[3])))


def _sandbox(r: tuple[object, ...]) -> SandboxRow:
    network = None if r[2] is None else str(r[2])
    token_hash = r[3]
    assert isinstance(token_hash, bytes)
    return SandboxRow(
        str(r[0]), str(r[1]), network, token_hash, parse_ts(str(r[4])), parse_ts(str(r[5]))
    )


_T_COLS = "name, body, created_at, updated_at"
_S_COLS = "id, template, network, token_hash, created_at, updated_at"


class PolicyRows:
    """Mixed into `Store`: uses its `_read`/`_write` transactions and lock."""

    def list_templates(self: _Conn) -> list[TemplateRow]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_T_COLS} FROM templates ORDER BY name").fetchall()
        return [_template(r) for r in rows]

    def get_template(self: _Conn, name: str) -> TemplateRow | None:
        with self._read() as conn:
            r = conn.execute(f"SELECT {_T_COLS} FROM templates WHERE name = ?", (name,)).fetchone()
        return _template(r) if r is not None else None

    def put_template(
        self: _Conn, name: str, body: str, *, now: datetime, create: bool
    ) -> TemplateRow:
        """Create (StoreConflict if taken) or replace (None-safe: returns the new row)."""
        with self._write() as conn:
            old = conn.execute(
                "SELECT created_at FROM templates WHERE name = ?", (name,)
            ).fetchone()
            if create and old is not None:
                raise StoreConflict(name)
            created = str(old[0]) if old is not None else ts(now)
            conn.execute(
                "INSERT OR REPLACE INTO templates (name, body, created_at, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (name, body, created, ts(now)),
            )
        return TemplateRow(name, body, parse_ts(created), now)

    def delete_template(self: _Conn, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM templates WHERE name = ?", (name,)).rowcount > 0

    def sandboxes_using(self: _Conn, template: str) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id FROM sandboxes WHERE template = ? ORDER BY id", (template,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def list_sandboxes(self: _Conn) -> list[SandboxRow]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_S_COLS} FROM sandboxes ORDER BY id").fetchall()
        return [_sandbox(r) for r in rows]

    def get_sandbox(self: _Conn, sandbox_id: str) -> SandboxRow | None:
        with self._read() as conn:
            r = conn.execute(
                f"SELECT {_S_COLS} FROM sandboxes WHERE id = ?", (sandbox_id,)
            ).fetchone()
        return _sandbox(r) if r is not None else None

    def create_sandbox(
        self: _Conn,
        sandbox_id: str,
        template: str,
        network: str | None,
        token_hash: bytes,
        *,
        now: datetime,
    ) -> SandboxRow:
        with self._write() as conn:
            try:
                conn.execute(
                    f"INSERT INTO sandboxes ({_S_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (sandbox_id, template, network, token_hash, ts(now), ts(now)),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(sandbox_id) from None
        return SandboxRow(sandbox_id, template, network, token_hash, now, now)

    def set_sandbox_network(
        self: _Conn, sandbox_id: str, network: str | None, *, now: datetime
    ) -> SandboxRow | None:
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE sandboxes SET network = ?, updated_at = ? WHERE id = ?",
                (network, ts(now), sandbox_id),
            ).rowcount
            r = conn.execute(
                f"SELECT {_S_COLS} FROM sandboxes WHERE id = ?", (sandbox_id,)
            ).fetchone()
        return _sandbox(r) if changed and r is not None else None

    def delete_sandbox(self: _Conn, sandbox_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)).rowcount > 0
