"""A throwaway PKI for the test suite.

Layout::

    egress-auth test root            (trusted by clients, the proxy and mTLS servers)
      └─ egress-auth test intermediate (pathlen 0; issues server and client leaves)
    egress-auth other root           (trusted by nobody)
      └─ egress-auth other intermediate (issues the "wrong" client certificate)

Server leaves are issued by the intermediate on purpose: a server (or client) that
forgets to send its intermediate fails verification against a root-only trust store,
so the tests notice chain handling mistakes.

EC P-256 keys keep generation in the millisecond range.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "IssuedPaths", "TestPKI"]

ROOT_CN = "egress-auth test root"
INTERMEDIATE_CN = "egress-auth test intermediate"
OTHER_ROOT_CN = "egress-auth other root"
OTHER_INTERMEDIATE_CN = "egress-auth other intermediate"

# Every issued cert is usable by any server or client, including 127.0.0.1 literals.
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-auth tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 unencrypted: accepted by ssl.load_cert_chain, OpenSSL and mitmproxy alike.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    # Back-date by an hour so small clock differences between threads/processes
    # (or a VM clock a little behind) never make a fresh cert "not yet valid".
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)


@dataclass(frozen=True)
class _CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return _cert_pem(self.cert)


def _make_root(cn: str) -> _CA:
    key = _new_key()
    not_before, not_after = _validity()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        # AKI on a self-signed root is optional, but strict verifiers (OpenSSL's
        # X509_STRICT, which newer Pythons enable by default) like to see it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _CA(cert, key)


def _make_intermediate(cn: str, issuer: _CA) -> _CA:
    key = _new_key()
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # pathlen 0: it may only issue leaves, like a real issuing CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(issuer), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return _CA(cert, key)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    # EC keys sign the (EC)DHE handshake, so digitalSignature is the only bit needed.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: _CA) -> x509.AuthorityKeyIdentifier:
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True)
class IssuedPaths:
    """Files written by :meth:`Issued.write`."""

    cert: Path  # leaf only
    key: Path
    chain: Path  # leaf + intermediates (what a TLS peer should send)
    bundle: Path  # chain followed by the key: the single-file form mitmproxy's client_certs wants


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes  # leaf followed by intermediates, never the root
    subject_cn: str

    def write(self, directory: Path, stem: str | None = None) -> IssuedPaths:
        """Write ``<stem>.crt``, ``.key``, ``.chain.pem`` and ``.bundle.pem`` into directory."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or _safe_stem(self.subject_cn)
        paths = IssuedPaths(
            cert=directory / f"{stem}.crt",
            key=directory / f"{stem}.key",
            chain=directory / f"{stem}.chain.pem",
            bundle=directory / f"{stem}.bundle.pem",
        )
        paths.cert.write_bytes(self.cert_pem)
        paths.key.write_bytes(self.key_pem)
        paths.key.chmod(0o600)
        paths.chain.write_bytes(self.chain_pem)
        paths.bundle.write_bytes(self.chain_pem + self.key_pem)
        paths.bundle.chmod(0o600)
        return paths


def _safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "cert"


ClientIssuer = Literal["intermediate", "root", "other"]


class TestPKI:
    """Root + intermediate that everything trusts, plus an unrelated "other" PKI."""

    # Stop pytest from trying to collect this class because its name starts with "Test".
    __test__ = False

    def __init__(
        self,
        directory: Path,
        root: _CA,
        intermediate: _CA,
        other_root: _CA,
        other_intermediate: _CA,
    ) -> None:
        self.directory = directory
        self._root = root
        self._intermediate = intermediate
        self._other_root = other_root
        self._other_intermediate = other_intermediate
        self._counter = itertools.count(1)

        directory.mkdir(parents=True, exist_ok=True)
        self.root_pem_path = directory / "root.pem"
        self.root_pem_path.write_bytes(root.pem)
        self.intermediate_pem_path = directory / "intermediate.pem"
        self.intermediate_pem_path.write_bytes(intermediate.pem)
        self.other_root_pem_path = directory / "other-root.pem"
        self.other_root_pem_path.write_bytes(other_root.pem)

    @classmethod
    def create(cls, directory: Path) -> TestPKI:
        root = _make_root(ROOT_CN)
        other_root = _make_root(OTHER_ROOT_CN)
        return cls(
            directory,
            root=root,
            intermediate=_make_intermediate(INTERMEDIATE_CN, root),
            other_root=other_root,
            other_intermediate=_make_intermediate(OTHER_INTERMEDIATE_CN, other_root),
        )

    @property
    def root_pem(self) -> bytes:
        return self._root.pem

    @property
    def intermediate_pem(self) -> bytes:
        return self._intermediate.pem

    @property
    def other_root_pem(self) -> bytes:
        return self._other_root.pem

    def unique_stem(self, prefix: str) -> str:
        """A file stem that never collides within this PKI directory."""
        return f"{_safe_stem(prefix)}-{next(self._counter)}"

    def server(self, names: list[str] | tuple[str, ...]) -> Issued:
        """A serverAuth leaf for ``names`` (DNS, or IP literals) plus IP 127.0.0.1."""
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                sans.append(x509.DNSName(name))
            else:
                if ip != LOOPBACK:
                    sans.append(x509.IPAddress(ip))
        # Always reachable as https://127.0.0.1:port too.
        sans.append(x509.IPAddress(LOOPBACK))
        cn = names[0] if names else str(LOOPBACK)
        return self._leaf(
            cn,
            self._intermediate,
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName(sans),
        )

    def client(self, cn: str, issuer: ClientIssuer = "intermediate") -> Issued:
        """A clientAuth leaf. ``issuer="other"`` gives one no test server trusts."""
        ca = {
            "intermediate": self._intermediate,
            "root": self._root,
            "other": self._other_intermediate,
        }[issuer]
        return self._leaf(cn, ca, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def _leaf(
        self,
        cn: str,
        issuer: _CA,
        eku: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None,
    ) -> Issued:
        key = _new_key()
        not_before, not_after = _validity()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(_aki(issuer), critical=False)
        )
        if san is not None:
            # SAN is critical only when the subject is empty; ours never is.
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(issuer.key, hashes.SHA256())
        leaf_pem = _cert_pem(cert)
        # Send intermediates but never the self-signed root: a peer must anchor on its own
        # trust store, and a root in the chain would mask "forgot the intermediate" bugs.
        is_root = issuer.cert.issuer == issuer.cert.subject
        chain_pem = leaf_pem if is_root else leaf_pem + issuer.pem
        return Issued(cert_pem=leaf_pem, key_pem=_key_pem(key), chain_pem=chain_pem, subject_cn=cn)
