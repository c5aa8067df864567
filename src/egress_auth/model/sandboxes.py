"""Sandbox wire models: a client identity of the proxy and its policy overrides."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr

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
