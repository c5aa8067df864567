"""Sandbox wire models: a client identity of the proxy and its policy overrides."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, SecretStr

from .base import Name, WireModel
from .policy import CredentialBinding, Egress


class NetworkOverrides(WireModel):
    """A sandbox's own policy: every field optional, merged over its template's."""

    mode: Literal["allow-all", "block-all"] | None = None
    egress: Egress | None = None
    credential_bindings: list[CredentialBinding] | None = None


class StaticSandbox(WireModel):
    """A sandbox declared in the config file; its token comes by ${env:}/${file:} reference."""

    id: Name
    template: Name
    token: SecretStr
    network: NetworkOverrides | None = None


class SandboxCreate(WireModel):
    id: Name
    template: Name
    network: NetworkOverrides | None = None


class SandboxInfo(WireModel):
    """What reads return: never the token (only its hash is stored)."""

    id: str
    template: str
    created_at: datetime
    updated_at: datetime
    origin: Literal["config", "api"] = "api"


class SandboxCreated(SandboxInfo):
    """The create answer: the token and a ready proxy URL, shown this once."""

    token: str
    proxy_url: str


class ExplainRequest(WireModel):
    method: str = Field(min_length=1, max_length=32)
    url: str = Field(min_length=1, max_length=8192)
    headers: dict[str, str] | None = None


class ExplainResult(WireModel):
    decision: Literal["injected", "denied", "failed-closed", "failed-open", "passed"]
    traffic_rule: str | None = None
    credential_rule: str | None = None
    binding: str | None = None
    source: str | None = None
    source_version: int | None = None
    reason: str | None = None
