"""The sealed SQLite store of credential sources (SPEC sections 2, 4 and 6)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import egress_auth.secrets.store as store_mod
from egress_auth.secrets.crypto import KEY_ENV, Box, MasterKeyError, SealError, encode_key
from egress_auth.secrets.store import (
    KindChanged,
    SourceExists,
    SourceNotFound,
    SourceRow,
    Store,
    StoreError,
    StoreKeyError,
)

KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
SECRET = "ghp_store-test-secret-0123456789"
CERT = {
    "subject": "CN=client",
    "issuer": "CN=ca",
    "notAfter": "2030-01-01T00:00:00Z",
    "sha256Fingerprint": "ab" * 32,
}


def spec(secret: str = SECRET) -> bytes:
    return json.dumps({"staticHeaders": {"values": {"token": secret}}}).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path, KEY) as s:
        yield s


def create(store: Store, name: str, secret: str = SECRET, **kw: object) -> SourceRow:
    args: dict[str, object] = {"expires_at": None, "certificate": None, "now": T0}
    args.update(kw)
    return store.create_source(name, "static_headers", spec(secret), **args)  # type: ignore[arg-type]


def replace(store: Store, name: str, secret: str = SECRET, **kw: object) -> SourceRow:
    args: dict[str, object] = {"expires_at": None, "certificate": None, "now": T0}
    args.update(kw)
    return store.replace_source(name, "static_headers", spec(secret), **args)  # type: ignore[arg-type]


def raw_sealed(tmp_path: Path, name: str) -> bytes:
    conn = sqlite3.connect(Store.path_in(tmp_path))
    try:
        (blob,) = conn.execute("SELECT sealed FROM sources WHERE name = ?", (name,)).fetchone()
        return bytes(blob)
    finally:
        conn.close()


# ---- opening and the key check ------------------------------------------------------------------


def test_new_store_files_and_settings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert not Store.exists(data)
    with Store.open(data, KEY) as s:
        assert Store.exists(data)
        assert s.path == data / "egress-auth.db" == Store.path_in(data)
        create(s, "a")
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            len(store_mod.MIGRATIONS),
        )
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for f in data.iterdir():  # the db, -wal and -shm files
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    conn = sqlite3.connect(Store.path_in(data))
    (check,) = conn.execute("SELECT value FROM meta WHERE key = 'check'").fetchone()
    conn.close()
    assert Box(KEY).open(check, b"meta:check") == b"egress-auth-check"


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path, KEY).close()
    with pytest.raises(StoreKeyError) as e:
        Store.open(tmp_path, NEW_KEY)
    assert str(e.value) == f"the master key does not open the store {tmp_path / 'egress-auth.db'}"
    assert isinstance(e.value, MasterKeyError) and isinstance(e.value, StoreError)
    Store.open(tmp_path, KEY).close()  # the refusal changed nothing


def test_reopen_is_idempotent(tmp_path: Path) -> None:
    with Store.open(tmp_path, KEY) as s:
        create(s, "a")
    with Store.open(tmp_path, KEY) as s:
        assert [r.name for r in s.list_sources()] == ["a"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path, KEY).close()
    conn = sqlite3.connect(Store.path_in(tmp_path))
    with conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store.open(tmp_path, KEY)


def test_not_a_database(tmp_path: Path) -> None:
    Store.path_in(tmp_path).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the store"):
        Store.open(tmp_path, KEY)


# ---- create / replace / delete / list -----------------------------------------------------------


def test_create_and_read(store: Store) -> None:
    expires = T0 + timedelta(days=1)
    row = create(store, "github", expires_at=expires, certificate=CERT)
    assert row == SourceRow(
        name="github",
        resolver_kind="static_headers",
        version=1,
        created_at=T0,
        updated_at=T0,
        expires_at=expires,
        certificate=CERT,
        has_material=True,
    )
    assert store.get_source("github") == row
    assert store.read_spec("github") == (row, spec())
    assert store.get_source("nope") is None
    assert store.read_spec("nope") is None


def test_create_twice_is_refused(store: Store) -> None:
    create(store, "a", "first")
    with pytest.raises(SourceExists):
        create(store, "a", "second")
    found = store.read_spec("a")
    assert found is not None and found[1] == spec("first")


def test_replace_bumps_version_and_keeps_created_at(store: Store) -> None:
    create(store, "a", "v1")
    later = T0 + timedelta(hours=1)
    row = replace(store, "a", "v2", now=later, certificate=CERT)
    assert (row.version, row.created_at, row.updated_at, row.certificate) == (2, T0, later, CERT)
    row = replace(store, "a", "v3", now=later + timedelta(seconds=1))
    assert (row.version, row.created_at, row.certificate) == (3, T0, None)
    found = store.read_spec("a")
    assert found is not None and found == (row, spec("v3"))


def test_replace_missing_or_other_kind(store: Store) -> None:
    with pytest.raises(SourceNotFound):
        replace(store, "missing")
    create(store, "a")
    with pytest.raises(KindChanged) as e:
        store.replace_source(
            "a",
            "static_username_password",
            b"{}",
            expires_at=None,
            certificate=None,
            now=T0,
        )
    assert "static_headers" in str(e.value)
    row = store.get_source("a")
    assert row is not None and row.version == 1


def test_delete(store: Store) -> None:
    create(store, "a")
    assert store.delete_source("a") is True
    assert store.delete_source("a") is False
    assert store.get_source("a") is None
    create(store, "a")  # the name is free again, from version 1
    row = store.get_source("a")
    assert row is not None and row.version == 1


def test_list_is_by_name(store: Store) -> None:
    for name in ["zeta", "alpha", "mid-1"]:
        create(store, name)
    assert [r.name for r in store.list_sources()] == ["alpha", "mid-1", "zeta"]


def test_timestamps_round_trip_exactly_after_reopen(tmp_path: Path) -> None:
    # Given in another zone; read back as the same instant in UTC, to the microsecond.
    plus2 = timezone(timedelta(hours=2))
    created = datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=plus2)
    updated = datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    expires = datetime(2031, 6, 7, 8, 9, 10, 654321, tzinfo=UTC)
    with Store.open(tmp_path, KEY) as s:
        create(s, "a", now=created)
        before = replace(s, "a", now=updated, expires_at=expires)
    with Store.open(tmp_path, KEY) as s:
        row = s.get_source("a")
    assert row == before
    assert row.created_at == created and row.updated_at == updated and row.expires_at == expires
    assert row.created_at.tzinfo == UTC and row.created_at.microsecond == 999999


def test_naive_timestamp_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        create(store, "a", now=datetime(2025, 1, 1))
    assert store.get_source("a") is None


# ---- aad binding --------------------------------------------------------------------------------


def test_ciphertext_moved_to_another_row_or_version_fails(tmp_path: Path) -> None:
    with Store.open(tmp_path, KEY) as s:
        create(s, "a", "secret-a")
        create(s, "b", "secret-b")
    blob_a_v1 = raw_sealed(tmp_path, "a")
    conn = sqlite3.connect(Store.path_in(tmp_path))
    with conn:
        conn.execute("UPDATE sources SET sealed = ? WHERE name = 'b'", (blob_a_v1,))
    conn.close()
    with Store.open(tmp_path, KEY) as s:
        with pytest.raises(SealError):
            s.read_spec("b")
        replace(s, "a", "secret-a2")
    conn = sqlite3.connect(Store.path_in(tmp_path))
    with conn:  # roll a's ciphertext back to version 1 while the row says 2
        conn.execute("UPDATE sources SET sealed = ? WHERE name = 'a'", (blob_a_v1,))
    conn.close()
    with Store.open(tmp_path, KEY) as s, pytest.raises(SealError):
        s.read_spec("a")


# ---- expiry -------------------------------------------------------------------------------------


def test_purge_expired(store: Store) -> None:
    create(store, "past", expires_at=T0 - timedelta(seconds=1))
    create(store, "now", expires_at=T0)
    create(store, "future", expires_at=T0 + timedelta(microseconds=1))
    create(store, "never")
    assert store.purge_expired(T0) == ["now", "past"]
    assert store.purge_expired(T0) == []  # already purged
    for name in ["now", "past"]:
        row = store.get_source(name)
        assert row is not None and not row.has_material and row.version == 1
        assert store.read_spec(name) is None
    assert [r.name for r in store.list_sources() if r.has_material] == ["future", "never"]
    assert store.purge_expired(T0 + timedelta(days=1)) == ["future"]
    # A PUT gives a purged source new material and a new version.
    row = replace(store, "past", "fresh", expires_at=None)
    assert row.has_material and row.version == 2
    assert store.read_spec("past") == (row, spec("fresh"))


# ---- concurrency --------------------------------------------------------------------------------


def test_concurrent_replaces_lose_no_update(store: Store) -> None:
    create(store, "a")
    errors: list[BaseException] = []
    versions: list[int] = []
    start = threading.Barrier(50)

    def work(i: int) -> None:
        try:
            start.wait()
            versions.append(replace(store, "a", f"secret-{i}").version)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(versions) == list(range(2, 52))
    found = store.read_spec("a")
    assert found is not None and found[0].version == 51


# ---- rekey --------------------------------------------------------------------------------------


def fill(store: Store, n: int = 5) -> None:
    for i in range(n):
        create(store, f"s{i}", f"secret-{i}")
    replace(store, "s0", "secret-0b")


def test_rekey(tmp_path: Path) -> None:
    with Store.open(tmp_path, KEY) as s:
        fill(s)
        create(s, "gone", expires_at=T0)
        s.purge_expired(T0)
        before = s.list_sources()
        assert s.rekey(NEW_KEY) == 5
        # The same object now seals and opens with the new key.
        create(s, "after", "secret-after")
        found = s.read_spec("s0")
        assert found is not None and found[1] == spec("secret-0b")
    with pytest.raises(StoreKeyError):
        Store.open(tmp_path, KEY)
    for name in ["s0", "s1", "s4", "after"]:
        blob = raw_sealed(tmp_path, name)
        version = 2 if name == "s0" else 1
        with pytest.raises(SealError):
            Box(KEY).open(blob, f"source:{name}:{version}".encode())
    with Store.open(tmp_path, NEW_KEY) as s:
        assert [r for r in s.list_sources() if r.name != "after"] == before  # metadata untouched
        for i in range(1, 5):
            assert s.read_spec(f"s{i}") == (s.get_source(f"s{i}"), spec(f"secret-{i}"))
        assert s.read_spec("gone") is None


def snapshot(tmp_path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(Store.path_in(tmp_path))
    try:
        return conn.execute(
            "SELECT * FROM sources UNION ALL SELECT key, value, 0, 0, 0, 0, 0, 0 FROM meta"
        ).fetchall()
    finally:
        conn.close()


def assert_on_old_key(tmp_path: Path, store: Store) -> None:
    # The live object still works with the old key...
    row = replace(store, "s1", "secret-1b")
    assert store.read_spec("s1") == (row, spec("secret-1b"))
    store.close()
    # ...and so does a fresh open, for every row.
    with pytest.raises(StoreKeyError):
        Store.open(tmp_path, NEW_KEY)
    with Store.open(tmp_path, KEY) as s:
        for r in s.list_sources():
            assert s.read_spec(r.name) is not None


def test_rekey_with_malformed_key_changes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path, KEY)
    fill(store)
    before = snapshot(tmp_path)
    with pytest.raises(MasterKeyError):
        store.rekey(b"sixteen-byte-key")
    assert snapshot(tmp_path) == before
    assert_on_old_key(tmp_path, store)


def test_rekey_failing_midway_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path, KEY)
    fill(store)
    before = snapshot(tmp_path)

    class FailingBox(Box):
        seals = 0

        def seal(self, plaintext: bytes, aad: bytes) -> bytes:
            FailingBox.seals += 1
            if FailingBox.seals == 3:
                raise RuntimeError("injected failure")
            return super().seal(plaintext, aad)

    monkeypatch.setattr(store_mod, "Box", FailingBox)
    with pytest.raises(RuntimeError, match="injected"):
        store.rekey(NEW_KEY)
    monkeypatch.undo()
    assert FailingBox.seals == 3
    assert snapshot(tmp_path) == before
    assert_on_old_key(tmp_path, store)


# ---- nothing plaintext on disk ------------------------------------------------------------------


def test_no_plaintext_secret_on_disk(tmp_path: Path) -> None:
    secrets = [f"pl41nt3xt-secret-{i}-{'x' * i}" for i in range(10)]
    with Store.open(tmp_path, KEY) as s:
        for i, secret in enumerate(secrets[:5]):
            create(s, f"s{i}", secret)
        for i, secret in enumerate(secrets[5:]):
            replace(s, f"s{i}", secret)
        s.delete_source("s4")
        s.rekey(NEW_KEY)
        files = sorted(p.name for p in tmp_path.iterdir())
        assert "egress-auth.db-wal" in files  # checked while the WAL still holds the writes
        blobs = {name: (tmp_path / name).read_bytes() for name in files}
    blobs["after-close"] = Store.path_in(tmp_path).read_bytes()  # checkpointed at close
    for name, data in blobs.items():
        for secret in secrets:
            assert secret.encode() not in data, name
        assert b"egress-auth-check" not in data, name
        assert KEY not in data and NEW_KEY not in data, name


# ---- durability ---------------------------------------------------------------------------------


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    with Store.open(tmp_path, KEY) as s:
        create(s, "durable")
    script = Path(__file__).parents[1] / "support" / "store_writer.py"
    env = {**os.environ, KEY_ENV: encode_key(KEY)}
    errors = tmp_path / "writer.stderr"
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert proc.stdout is not None
    acked: list[int] = []
    first = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.endswith(b"\n"):  # a cut-off line was never fully acknowledged
                acked.append(int(line))
                first.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert first.wait(timeout=10), errors.read_text()
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t.join(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 2 and acked == list(range(2, 2 + len(acked)))
    with Store.open(tmp_path, KEY) as s:
        found = s.read_spec("durable")
    assert found is not None
    row, data = found
    assert row.version >= acked[-1]
    assert json.loads(data) == {"staticHeaders": {"values": {"token": "durable-secret"}}}
