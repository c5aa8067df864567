"""The sealing box and the master key rules (SPEC sections 4 and 6)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from egress_auth.secrets.crypto import (
    KEY_ENV,
    Box,
    MasterKeyError,
    SealError,
    encode_key,
    load_master_key,
    new_key,
    parse_key,
    write_key_file,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SECRET = b"ghp_crypto-test-secret-0123456789"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- Box ----------------------------------------------------------------------------------------


def test_seal_open_round_trip() -> None:
    box = Box(KEY)
    blob = box.seal(SECRET, b"source:a:1")
    assert SECRET not in blob
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(SECRET) + 16
    assert box.open(blob, b"source:a:1") == SECRET
    assert Box(KEY).open(blob, b"source:a:1") == SECRET  # only the key matters, not the object


def test_empty_plaintext_round_trips() -> None:
    box = Box(KEY)
    assert box.open(box.seal(b"", b"x"), b"x") == b""


@pytest.mark.parametrize("aad", [b"source:b:1", b"source:a:2", b"", b"meta:check"])
def test_other_aad_fails(aad: bytes) -> None:
    box = Box(KEY)
    blob = box.seal(SECRET, b"source:a:1")
    with pytest.raises(SealError) as e:
        box.open(blob, aad)
    assert str(e.value) == "cannot open sealed data (wrong key or tampered)"


def test_wrong_key_fails() -> None:
    blob = Box(KEY).seal(SECRET, b"aad")
    with pytest.raises(SealError):
        Box(OTHER_KEY).open(blob, b"aad")


def test_every_tampered_byte_fails() -> None:
    box = Box(KEY)
    blob = box.seal(SECRET, b"aad")
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(SealError):
            box.open(bytes(bad), b"aad")


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + b"\x00" * 27, b"\x02" + b"\x00" * 40])
def test_short_or_unknown_format_fails(blob: bytes) -> None:
    with pytest.raises(SealError):
        Box(KEY).open(blob, b"aad")


def test_nonces_differ() -> None:
    box = Box(KEY)
    blobs = [box.seal(SECRET, b"aad") for _ in range(200)]
    assert len({b[1:13] for b in blobs}) == 200
    assert len(set(blobs)) == 200


def test_box_rejects_wrong_key_length_and_hides_key() -> None:
    with pytest.raises(MasterKeyError):
        Box(b"short")
    assert KEY.hex() not in repr(Box(KEY))
    assert repr(KEY) not in repr(Box(KEY))


# ---- parse_key ----------------------------------------------------------------------------------


def test_parse_key_accepts_surrounding_whitespace() -> None:
    assert parse_key(f"  {encode_key(KEY)}\n") == KEY


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!!",
        base64.b64encode(b"x" * 31).decode(),
        base64.b64encode(b"x" * 33).decode(),
        encode_key(KEY)[:-1],
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    ],
)
def test_parse_key_refuses_and_never_echoes(text: str) -> None:
    with pytest.raises(MasterKeyError) as e:
        parse_key(text)
    assert str(e.value) == f"{KEY_ENV} is not base64 of 32 bytes"
    # No chained decoder error that could carry part of the text along.
    assert e.value.__context__ is None or e.value.__suppress_context__


def test_parse_key_names_its_source() -> None:
    with pytest.raises(MasterKeyError, match=r"^/x/master\.key is not base64"):
        parse_key("nope", source="/x/master.key")


def test_new_key_is_random_32_bytes() -> None:
    a, b = new_key(), new_key()
    assert len(a) == 32 and a != b
    assert parse_key(encode_key(a)) == a


# ---- load_master_key ----------------------------------------------------------------------------


def test_env_wins_over_file(tmp_path: Path) -> None:
    write_key_file(tmp_path / "master.key", OTHER_KEY)
    assert load_master_key(tmp_path, store_exists=True, env={KEY_ENV: encode_key(KEY)}) == KEY


def test_env_bad_value_is_named_not_shown(tmp_path: Path) -> None:
    value = "c2VjcmV0LWJ1dC10b28tc2hvcnQ="
    with pytest.raises(MasterKeyError) as e:
        load_master_key(tmp_path, store_exists=False, env={KEY_ENV: value})
    assert KEY_ENV in str(e.value) and value not in str(e.value)
    assert not (tmp_path / "master.key").exists()


def test_env_empty_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="set but empty"):
        load_master_key(tmp_path, store_exists=False, env={KEY_ENV: " "})
    assert not (tmp_path / "master.key").exists()


def test_key_file_is_read(tmp_path: Path) -> None:
    write_key_file(tmp_path / "master.key", KEY)
    assert mode(tmp_path / "master.key") == 0o600
    assert load_master_key(tmp_path, store_exists=True, env={}) == KEY


def test_generated_when_store_is_new(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = load_master_key(data, store_exists=False, env={})
    path = data / "master.key"
    assert len(key) == 32
    assert mode(data) == 0o700
    assert mode(path) == 0o600
    assert parse_key(path.read_text()) == key
    assert [p.name for p in data.iterdir()] == ["master.key"]  # no temp file left
    # Later starts read the same key, also once the store exists.
    assert load_master_key(data, store_exists=False, env={}) == key
    assert load_master_key(data, store_exists=True, env={}) == key


def test_generation_keeps_a_key_that_appeared_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process writes master.key between our "missing" and our write: we must use
    # theirs, never overwrite it.
    import egress_auth.secrets.crypto as crypto

    real_new_key = crypto.new_key

    def racing_new_key() -> bytes:
        write_key_file(tmp_path / "master.key", OTHER_KEY)
        return real_new_key()

    monkeypatch.setattr(crypto, "new_key", racing_new_key)
    assert load_master_key(tmp_path, store_exists=False, env={}) == OTHER_KEY
    assert parse_key((tmp_path / "master.key").read_text()) == OTHER_KEY


def test_missing_key_for_existing_store(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError) as e:
        load_master_key(tmp_path, store_exists=True, env={})
    assert str(e.value) == (
        f"the store {tmp_path / 'egress-auth.db'} exists but its master key is missing: "
        f"set {KEY_ENV} or restore {tmp_path / 'master.key'}"
    )
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_open_to_others_is_refused(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, KEY)
    path.chmod(bad_mode)
    with pytest.raises(MasterKeyError) as e:
        load_master_key(tmp_path, store_exists=True, env={})
    assert f"chmod 600 {path}" in str(e.value)
    assert encode_key(KEY) not in str(e.value)


def test_key_file_with_bad_content(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("hunter2-not-a-key\n")
    path.chmod(0o600)
    with pytest.raises(MasterKeyError) as e:
        load_master_key(tmp_path, store_exists=True, env={})
    assert str(e.value) == f"{path} is not base64 of 32 bytes"


def test_unreadable_key_file_gives_os_reason(tmp_path: Path) -> None:
    # A symlink loop is unreadable even for root (chmod 000 is not).
    path = tmp_path / "master.key"
    os.symlink(path, path)
    with pytest.raises(MasterKeyError, match=r"cannot read .*master\.key: Too many levels"):
        load_master_key(tmp_path, store_exists=True, env={})


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "master.key").mkdir(mode=0o700)
    with pytest.raises(MasterKeyError, match="not a regular file"):
        load_master_key(tmp_path, store_exists=False, env={})


def test_write_key_file_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, KEY)
    path.chmod(0o644)  # the replacement gets 0600 regardless of the old file
    write_key_file(path, OTHER_KEY)
    assert mode(path) == 0o600
    assert parse_key(path.read_text()) == OTHER_KEY
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]
    with pytest.raises(MasterKeyError):
        write_key_file(path, b"short")
