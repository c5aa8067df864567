"""Credential source wire models: the write shape (carries secrets) and the metadata read shape."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

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


class CredentialSource(WireModel):
    """A source as written (config file or API): name, kind and secret spec."""

    name: Name
    resolver_kind: ResolverKind
    spec: SourceSpec
    expires_at: datetime | None = None

    @model_validator(mode="after")
    def _spec_matches_kind(self) -> CredentialSource:
        want = SPEC_MEMBER[self.resolver_kind]
        have = self.spec.members()
        if have != [want]:
            raise ValueError(
                f"spec must have exactly one member, {want!r}, for resolverKind "
                f"{self.resolver_kind!r} (found: {', '.join(have) or 'none'})"
            )
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expiresAt must be an RFC 3339 time with a timezone offset")
        return self

    def keys(self) -> frozenset[str]:
        """The keys a valueTemplate may refer to."""
        if self.spec.static_headers is not None:
            return frozenset(self.spec.static_headers.values)
        if self.spec.static_username_password is not None:
            return frozenset({"username", "password"})
        return frozenset()
