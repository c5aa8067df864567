"""The master key and the AES-256-GCM box that seals secrets at rest.

Nothing here ever puts key or plaintext bytes into an exception message or a repr: errors name
where a key came from and why it was refused, never what it was.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "EGRESS_AUTH_MASTER_KEY"
KEY_FILE = "master.key"
# The store's file name lives here (store.py imports it) so that the "key is missing" message
# can name the store without this module importing store.py.
STORE_FILE = "egress-auth.db"
KEY_SIZE = 32

_FORMAT_V1 = b"\x01"
_NONCE_SIZE = 12
_TAG_SIZE = 16
_KEY_FILE_LIMIT = 1024


class MasterKeyError(Exception):
    """The master key is missing, malformed, unsafe or wrong: one line, for `egress-auth: ...`."""


class SealError(Exception):
    """A sealed blob did not open. Deliberately says nothing more (no oracle, no bytes)."""

    def __init__(self) -> None:
        super().__init__("cannot open sealed data (wrong key or tampered)")


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def parse_key(text: str, *, source: str = KEY_ENV) -> bytes:
    """Decode base64 of exactly 32 bytes; `source` names where the text came from."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        # `from None`: the decoder's own error must not drag any part of the text along.
        raise MasterKeyError(f"{source} is not base64 of {KEY_SIZE} bytes") from None
    if len(key) != KEY_SIZE:
        raise MasterKeyError(f"{source} is not base64 of {KEY_SIZE} bytes")
    return key


def load_master_key(
    data_dir: Path, *, store_exists: bool, env: Mapping[str, str] | None = None
) -> bytes:
    """The key from the environment, else `<data_dir>/master.key`.

    A missing key file is generated only for a new store: for an existing one a fresh key could
    never open it, and silently making one would hide a lost or misplaced key.
    """
    environ = os.environ if env is None else env
    if KEY_ENV in environ:
        # Set-but-empty is refused rather than ignored: it usually means a deployment meant to
        # pass a key and lost it, and falling back to a file would bind the store to another key.
        if not environ[KEY_ENV].strip():
            raise MasterKeyError(f"{KEY_ENV} is set but empty")
        return parse_key(environ[KEY_ENV])
    path = data_dir / KEY_FILE
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    if store_exists:
        raise MasterKeyError(
            f"the store {data_dir / STORE_FILE} exists but its master key is missing: "
            f"set {KEY_ENV} or restore {path}"
        )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = new_key()
    try:
        _write_private(path, _key_text(key), replace=False)
    except FileExistsError:
        # Another process generated it first: use theirs, or the two would disagree.
        try:
            return _read_key_file(path)
        except FileNotFoundError as e:
            raise MasterKeyError(f"cannot read {path}: {e.strerror}") from None
    except OSError as e:
        raise MasterKeyError(f"cannot write {path}: {e.strerror}") from None
    return key


def write_key_file(path: Path, key: bytes) -> None:
    """Atomically (re)write a key file with mode 0600: a crash leaves the old file or the new."""
    if len(key) != KEY_SIZE:
        raise MasterKeyError(f"a master key must be {KEY_SIZE} bytes")
    _write_private(path, _key_text(key), replace=True)


def _key_text(key: bytes) -> bytes:
    return (encode_key(key) + "\n").encode("ascii")


def _read_key_file(path: Path) -> bytes:
    """Read and check a key file. FileNotFoundError passes through; all else is MasterKeyError."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise MasterKeyError(f"cannot read {path}: {e.strerror}") from None
    try:
        # fstat on the open descriptor: the file checked is the file read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            # Refuse, not warn: a key others can read has already leaked, and a key others can
            # write can be swapped.
            raise MasterKeyError(
                f"{path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
            )
        # A key file is 45 bytes; a regular file's read returns all it has up to the limit.
        raw = os.read(fd, _KEY_FILE_LIMIT + 1)
    except OSError as e:
        raise MasterKeyError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > _KEY_FILE_LIMIT:
        raise MasterKeyError(f"{path} is not base64 of {KEY_SIZE} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise MasterKeyError(f"{path} is not base64 of {KEY_SIZE} bytes") from None
    return parse_key(text, source=str(path))


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write `data` to a 0600 temp file, fsync, then move it into place and fsync the folder.

    `replace=False` links instead of renaming, so it fails with FileExistsError rather than
    overwriting a file that appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have cut the mode further
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Box:
    """AES-256-GCM under one key. Blob = version byte 0x01 + 12-byte nonce + ciphertext + tag."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise MasterKeyError(f"a master key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Box(<key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        # A fresh random 96-bit nonce per seal: writes per key are far below the ~2**32 seals
        # where random nonces start to risk a repeat, and a counter would need persistent state.
        nonce = os.urandom(_NONCE_SIZE)
        return _FORMAT_V1 + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 1 + _NONCE_SIZE + _TAG_SIZE or blob[:1] != _FORMAT_V1:
            raise SealError()
        nonce = blob[1 : 1 + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_SIZE :], aad)
        except (InvalidTag, ValueError):
            raise SealError() from None
