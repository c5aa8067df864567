"""The SQLite repository of credential sources, with each source's spec sealed at rest.

One connection per Store, shared by threads under one lock: SQLite transactions belong to a
connection, so two threads interleaving statements on it would see (and commit) each other's
half-done work. Writes are short, so serialising them costs nothing that matters here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from .crypto import STORE_FILE, Box, MasterKeyError, SealError
from .policy_rows import PolicyRows
from .timestamps import parse_ts, ts

_CHECK_PLAINTEXT = b"egress-auth-check"
_CHECK_AAD = b"meta:check"

# Ordered; migration i brings the schema from version i to i + 1, in one transaction. Never edit
# a shipped entry: append a new one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
        """
        CREATE TABLE sources (
            name TEXT PRIMARY KEY,
            resolver_kind TEXT NOT NULL,
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            expires_at TEXT NULL,
            certificate TEXT NULL,  -- public facts as JSON
            sealed BLOB NULL        -- NULL once purged
        )
        """,
    ),
    (
        """
        CREATE TABLE templates (
            name TEXT PRIMARY KEY,
            body TEXT NOT NULL,     -- the template as JSON; policy, not secret
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY,
            template TEXT NOT NULL,
            network TEXT NULL,      -- the sandbox's own overrides as JSON
            token_hash BLOB NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """,
    ),
]


class StoreError(Exception):
    """Root of the store's errors. Messages carry names and paths, never secret values."""


class StoreKeyError(StoreError, MasterKeyError):
    """The master key does not open this store (a MasterKeyError, so start-up exits with it)."""


class SourceExists(StoreError):
    pass


class SourceNotFound(StoreError):
    pass


class KindChanged(StoreError):
    pass


@dataclass(frozen=True)
class SourceRow:
    """A source's metadata: everything but the sealed spec."""

    name: str
    resolver_kind: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    certificate: dict[str, str] | None
    has_material: bool


def _aad(name: str, version: int) -> bytes:
    # Binding name and version: a ciphertext copied into another row, or an older version
    # written back, fails to open instead of resolving as the wrong secret.
    return f"source:{name}:{version}".encode()


_COLUMNS = (
    "name, resolver_kind, version, created_at, updated_at, expires_at, certificate,"
    " sealed IS NOT NULL"
)


def _row(r: tuple[object, ...]) -> SourceRow:
    name, kind, version, created, updated, expires, cert, has = r
    assert isinstance(name, str) and isinstance(kind, str) and isinstance(version, int)
    assert isinstance(created, str) and isinstance(updated, str)
    return SourceRow(
        name=name,
        resolver_kind=kind,
        version=version,
        created_at=parse_ts(created),
        updated_at=parse_ts(updated),
        expires_at=parse_ts(expires) if isinstance(expires, str) else None,
        certificate=json.loads(cert) if isinstance(cert, str) else None,
        has_material=bool(has),
    )


class Store(PolicyRows):
    def __init__(self, path: Path, conn: sqlite3.Connection, box: Box) -> None:
        self.path = path
        self._conn = conn
        self._box = box
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---- lifecycle --------------------------------------------------------------------------

    @staticmethod
    def path_in(data_dir: Path) -> Path:
        return data_dir / STORE_FILE

    @staticmethod
    def exists(data_dir: Path) -> bool:
        return Store.path_in(data_dir).exists()

    @classmethod
    def open(cls, data_dir: Path, key: bytes, *, readonly: bool = False) -> Store:
        """Open (creating when new) the store and prove that `key` opens it.

        `readonly`: for the extra proxy processes of `run --workers`, which only read what
        the admin API's process wrote; the store must exist, and it is never migrated.
        """
        box = Box(key)
        path = cls.path_in(data_dir)
        try:
            if not readonly:
                data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Create the file 0600 before SQLite does (it would use 0644); SQLite gives
                # the -wal and -shm files the database file's mode.
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = _connect(path, readonly=readonly)
        except OSError as e:
            raise StoreError(f"cannot open the store {path}: {e.strerror}") from None
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the store {path}: {e}") from None
        store = cls(path, conn, box)
        try:
            if not readonly:
                store._migrate()
            check = conn.execute("SELECT value FROM meta WHERE key = 'check'").fetchone()
            if check is None:
                raise StoreError(f"the store {path} is damaged: it has no check value")
            box.open(check[0], _CHECK_AAD)
        except SealError:
            conn.close()
            raise StoreKeyError(f"the master key does not open the store {path}") from None
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"cannot open the store {path}: {e}") from None
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _migrate(self) -> None:
        if self._schema_version(self._conn) == len(MIGRATIONS):
            return  # the usual case: no write lock needed to open an up-to-date store
        for target, statements in enumerate(MIGRATIONS, start=1):
            with self._write() as conn:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                current = self._schema_version(conn)
                if current > len(MIGRATIONS):
                    raise StoreError(
                        f"the store {self.path} has schema version {current}, newer than this "
                        f"egress-auth knows ({len(MIGRATIONS)})"
                    )
                if current >= target:
                    continue
                for sql in statements:
                    conn.execute(sql)
                if target == 1:
                    # Written with the schema, in the same transaction: no store ever exists
                    # without the value that proves which key it belongs to.
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('check', ?)",
                        (self._box.seal(_CHECK_PLAINTEXT, _CHECK_AAD),),
                    )
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (target,),
                )

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row is not None else 0

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._transaction() as conn:
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer transaction; the caller holds `_lock`. IMMEDIATE takes SQLite's write lock
        up front, so a read made inside cannot go stale before the write that depends on it
        (no lost update, also across processes)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    # ---- reads ------------------------------------------------------------------------------

    def list_sources(self) -> list[SourceRow]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM sources ORDER BY name").fetchall()
        return [_row(r) for r in rows]

    def get_source(self, name: str) -> SourceRow | None:
        with self._read() as conn:
            r = conn.execute(f"SELECT {_COLUMNS} FROM sources WHERE name = ?", (name,)).fetchone()
        return _row(r) if r is not None else None

    def read_spec(self, name: str) -> tuple[SourceRow, bytes] | None:
        """The row and its decrypted spec JSON; None when missing or purged."""
        with self._read() as conn:
            r = conn.execute(
                f"SELECT {_COLUMNS}, sealed FROM sources WHERE name = ?", (name,)
            ).fetchone()
            box = self._box  # read under the lock: rekey swaps it
        if r is None or r[-1] is None:
            return None
        row = _row(r[:-1])
        return row, box.open(r[-1], _aad(row.name, row.version))

    # ---- writes -----------------------------------------------------------------------------

    def create_source(
        self,
        name: str,
        resolver_kind: str,
        spec_json: bytes,
        *,
        expires_at: datetime | None,
        certificate: dict[str, str] | None,
        now: datetime,
    ) -> SourceRow:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM sources WHERE name = ?", (name,)).fetchone():
                raise SourceExists(f"credential source {name!r} already exists")
            conn.execute(
                "INSERT INTO sources (name, resolver_kind, version, created_at, updated_at,"
                " expires_at, certificate, sealed) VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                (
                    name,
                    resolver_kind,
                    ts(now),
                    ts(now),
                    ts(expires_at) if expires_at else None,
                    _cert(certificate),
                    self._box.seal(spec_json, _aad(name, 1)),
                ),
            )
            r = conn.execute(f"SELECT {_COLUMNS} FROM sources WHERE name = ?", (name,)).fetchone()
        return _row(r)

    def replace_source(
        self,
        name: str,
        resolver_kind: str,
        spec_json: bytes,
        *,
        expires_at: datetime | None,
        certificate: dict[str, str] | None,
        now: datetime,
    ) -> SourceRow:
        with self._write() as conn:
            cur = conn.execute(
                "SELECT resolver_kind, version FROM sources WHERE name = ?", (name,)
            ).fetchone()
            if cur is None:
                raise SourceNotFound(f"credential source {name!r} does not exist")
            if cur[0] != resolver_kind:
                raise KindChanged(
                    f"credential source {name!r} is {cur[0]}; its resolverKind cannot change"
                )
            version = int(cur[1]) + 1
            conn.execute(
                "UPDATE sources SET version = ?, updated_at = ?, expires_at = ?,"
                " certificate = ?, sealed = ? WHERE name = ?",
                (
                    version,
                    ts(now),
                    ts(expires_at) if expires_at else None,
                    _cert(certificate),
                    self._box.seal(spec_json, _aad(name, version)),
                    name,
                ),
            )
            r = conn.execute(f"SELECT {_COLUMNS} FROM sources WHERE name = ?", (name,)).fetchone()
        return _row(r)

    def delete_source(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM sources WHERE name = ?", (name,)).rowcount > 0

    def purge_expired(self, now: datetime) -> list[str]:
        """Drop the sealed material of sources expired at `now`; their metadata stays."""
        with self._write() as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sources WHERE expires_at IS NOT NULL AND expires_at <= ?"
                    " AND sealed IS NOT NULL ORDER BY name",
                    (ts(now),),
                )
            ]
            conn.executemany(
                "UPDATE sources SET sealed = NULL WHERE name = ?", [(n,) for n in names]
            )
        return names

    def rekey(self, new_key: bytes) -> int:
        """Re-seal every source and the check value under `new_key`, all or nothing.

        Returns the number of sources re-sealed (purged ones have nothing to re-seal). Only after
        the commit does this Store switch to the new key.
        """
        new_box = Box(new_key)  # a malformed key fails here, before anything is touched
        with self._lock:
            with self._transaction() as conn:
                count = self._reseal(conn, self._box, new_box)
            # Swapped after the commit but before the lock is released: no write can slip in
            # between and seal under the key the store no longer uses.
            self._box = new_box
        return count

    @staticmethod
    def _reseal(conn: sqlite3.Connection, old_box: Box, new_box: Box) -> int:
        rows = conn.execute(
            "SELECT name, version, sealed FROM sources WHERE sealed IS NOT NULL ORDER BY name"
        ).fetchall()
        for name, version, sealed in rows:
            aad = _aad(name, version)
            conn.execute(
                "UPDATE sources SET sealed = ? WHERE name = ?",
                (new_box.seal(old_box.open(sealed, aad), aad), name),
            )
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'check'",
            (new_box.seal(_CHECK_PLAINTEXT, _CHECK_AAD),),
        )
        return len(rows)


def _cert(certificate: dict[str, str] | None) -> str | None:
    return json.dumps(certificate, sort_keys=True) if certificate is not None else None


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    # isolation_level=None: no implicit BEGINs; every write states its own BEGIN IMMEDIATE.
    # timeout: wait for another process's write lock instead of failing at once.
    if readonly:
        # The writer set WAL mode and the other pragmas in the file; a reader sets none.
        return sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=10.0,
            isolation_level=None,
            check_same_thread=False,
        )
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: an acknowledged write survives kill -9 and power
        # loss (NORMAL in WAL mode may lose the last commits on power loss).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Overwrite freed pages with zeros so old ciphertexts do not linger in the file.
        conn.execute("PRAGMA secure_delete=ON")
    except BaseException:
        conn.close()
        raise
    return conn
