"""Resolved secret material, wrapped so that printing it never shows it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ..model.sources import CredentialSource

MASK = "**********"


class Secret:
    """A secret string. `repr`/`str`/format show a mask; `reveal()` is the one way out.

    `reveal` is called only at the moment of injection, so a stray f-string or log call
    can only ever print the mask.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Refuse pickling: a pickled secret is a plaintext secret on disk or on a wire.
        raise TypeError("Secret cannot be pickled")


class MaterialError(ValueError):
    """Secret material is unusable. Carries a field name and a reason, never a value."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class CertificateFacts:
    """The non-secret facts of a client certificate, safe to show and log."""

    subject: str
    issuer: str
    not_after: datetime
    sha256_fingerprint: str


@dataclass(frozen=True)
class TlsMaterial:
    chain_pem: bytes  # leaf first, then intermediates (public)
    key_pem: Secret  # private key, PEM text
    ca_pem: bytes | None  # when set, the upstream is verified against this CA only
    facts: CertificateFacts


@dataclass(frozen=True)
class Material:
    """What one source version resolves to."""

    values: dict[str, Secret] = field(default_factory=dict)  # template keys -> values
    tls: TlsMaterial | None = None


_KeyTypes = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def _load_certs(pem: str, field_name: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise MaterialError(field_name, "is not a PEM certificate (or chain)") from None
    if not certs:
        raise MaterialError(field_name, "holds no certificate")
    return certs


def _check_chain_order(certs: list[x509.Certificate]) -> None:
    for i, (child, parent) in enumerate(itertools.pairwise(certs)):
        if child.issuer != parent.subject:
            raise MaterialError(
                "certificatePem",
                f"certificate {i + 1} is not issued by certificate {i + 2}: "
                "the chain must be the leaf first, then each issuer in order",
            )
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise MaterialError(
                "certificatePem", f"certificate {i + 1} is not signed by certificate {i + 2}"
            ) from None


def certificate_facts(cert: x509.Certificate) -> CertificateFacts:
    return CertificateFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":"),
    )


def load_tls_material(
    certificate_pem: str, private_key_pem: str, ca_pem: str | None
) -> TlsMaterial:
    """Parse and cross-check a client certificate source. Errors name the field, not the value."""
    certs = _load_certs(certificate_pem, "certificatePem")
    _check_chain_order(certs)
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError):
        # The parser's own message can quote key bytes; replace it with a fixed reason.
        raise MaterialError("privateKeyPem", "is not an unencrypted PEM private key") from None
    if not isinstance(key, _KeyTypes):
        raise MaterialError("privateKeyPem", "key type is not supported for TLS")
    leaf_pub = (
        certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    key_pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if leaf_pub != key_pub:
        raise MaterialError("privateKeyPem", "does not match the first (leaf) certificate")
    ca_bytes: bytes | None = None
    if ca_pem is not None:
        ca_certs = _load_certs(ca_pem, "caPem")
        ca_bytes = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca_certs)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    # Re-serialise the key: it normalises the PEM and drops anything else the text held.
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return TlsMaterial(chain, Secret(key_text), ca_bytes, certificate_facts(certs[0]))


def material_of(source: CredentialSource) -> Material:
    """Turn a validated source into material. Raises MaterialError for a bad PEM."""
    spec = source.spec
    if spec.static_headers is not None:
        return Material(
            values={k: Secret(v.get_secret_value()) for k, v in spec.static_headers.values.items()}
        )
    if spec.static_username_password is not None:
        up = spec.static_username_password
        return Material(
            values={
                "username": Secret(up.username.get_secret_value()),
                "password": Secret(up.password.get_secret_value()),
            }
        )
    tls = spec.static_tls_client_certificate
    assert tls is not None  # the model guarantees exactly one member
    return Material(
        tls=load_tls_material(
            tls.certificate_pem, tls.private_key_pem.get_secret_value(), tls.ca_pem
        )
    )
