"""Credential source wire models: the write shape (carries secrets) and the metadata read shape."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from .base import Name, WireModel

ResolverKind = Literal[
    "static_headers", "static_username_password", "static_tls_client_certificate"
]

# Which spec member each resolver kind requires.
SPEC_MEMBER: dict[str, str] = {
    "static_headers": "staticHeaders",
    "static_username_password": "staticUsernamePassword",
    "static_tls_client_certificate": "staticTLSClientCertificate",
}


def _no_control(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")
    return value


class StaticHeadersSpec(WireModel):
    # SecretStr: a printed or logged model shows '**********', never the value.
    values: dict[str, SecretStr] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _values_are_header_safe(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key, secret in v.items():
            if not key:
                raise ValueError("keys must not be empty")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                # Name the key, never the value.
                raise ValueError(f"value of key {key!r} must not contain CR, LF or NUL")
        return v


class StaticUsernamePasswordSpec(WireModel):
    username: SecretStr
    password: SecretStr

    @field_validator("username")
    @classmethod
    def _username_has_no_colon(cls, v: SecretStr) -> SecretStr:
        # RFC 7617: a user-id containing ':' cannot be represented in Basic auth.
        if ":" in v.get_secret_value():
            raise ValueError("must not contain ':' (HTTP basic auth cannot carry it)")
        _no_control(v.get_secret_value())
        return v

    @field_validator("password")
    @classmethod
    def _password_safe(cls, v: SecretStr) -> SecretStr:
        _no_control(v.get_secret_value())
        return v


class StaticTLSClientCertificateSpec(WireModel):
    certificate_pem: str = Field(min_length=1)
    private_key_pem: SecretStr
    ca_pem: str | None = None


class SourceSpec(WireModel):
    static_headers: StaticHeadersSpec | None = None
    static_username_password: StaticUsernamePasswordSpec | None = None
    static_tls_client_certificate: StaticTLSClientCertificateSpec | None = Field(
        default=None, alias="staticTLSClientCertificate"
    )

    def members(self) -> list[str]:
        return [
            alias
            for alias, value in (
                ("staticHeaders", self.static_headers),
                ("staticUsernamePassword", self.static_username_password),
                ("staticTLSClientCertificate", self.static_tls_client_certificate),
            )
            if value is not None
        ]


class SourceBody(WireModel):
    """What a source write carries besides its name."""

    resolver_kind: ResolverKind
    spec: SourceSpec
    expires_at: datetime | None = None

    @field_validator("spec")
    @classmethod
    def _spec_matches_kind(cls, spec: SourceSpec, info: ValidationInfo) -> SourceSpec:
        kind = info.data.get("resolver_kind")
        if kind is None:  # the kind itself is invalid and reported on its own
            return spec
        want = SPEC_MEMBER[kind]
        have = spec.members()
        if have != [want]:
            raise ValueError(
                f"must have exactly one member, {want!r}, for resolverKind {kind!r} "
                f"(found: {', '.join(have) or 'none'})"
            )
        return spec

    @field_validator("expires_at")
    @classmethod
    def _expiry_has_zone(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must be an RFC 3339 time with a timezone offset")
        return v

    def keys(self) -> frozenset[str]:
        """The keys a valueTemplate may refer to."""
        if self.spec.static_headers is not None:
            return frozenset(self.spec.static_headers.values)
        if self.spec.static_username_password is not None:
            return frozenset({"username", "password"})
        return frozenset()


class CredentialSource(SourceBody):
    """A source as written (config file or API create): name, kind and secret spec."""

    name: Name


class SourceReplace(SourceBody):
    """The body of a PUT: the name comes from the path (and must match it when given)."""

    name: Name | None = None


class CertificateInfo(WireModel):
    subject: str
    issuer: str
    not_after: datetime
    sha256_fingerprint: str


class SourceMetadata(WireModel):
    """What reads return: never the spec."""

    name: str
    resolver_kind: ResolverKind
    current_version: int
    status: Literal["ready", "expired"]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    certificate: CertificateInfo | None = None
    # Where the source is declared: `config` sources are read-only through the API.
    origin: Literal["config", "api"] = "api"
