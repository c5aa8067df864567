"""The config file's shape (SPEC section 5)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from .base import Name, WireModel
from .policy import Template
from .sandboxes import StaticSandbox
from .sources import CredentialSource


def split_host_port(value: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:8080`); raise ValueError naming the problem."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError("an IPv6 address must be written in brackets, as [::1]:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(port_text)


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]


class ProxySettings(WireModel):
    listen: HostPort = "127.0.0.1:8080"
    # None means: decided from the listen address (optional on loopback, required elsewhere).
    sandbox_auth: Literal["required", "optional"] | None = None
    default_template: Name = "default"
    intercept: Literal["matching", "all"] = "matching"
    upstream_ca_file: str | None = None
    connect_to: dict[HostPort, HostPort] = Field(default_factory=dict)


class AdminSettings(WireModel):
    listen: HostPort = "127.0.0.1:8081"


class ConfigFile(WireModel):
    proxy: ProxySettings = ProxySettings()
    admin: AdminSettings = AdminSettings()
    sources: list[CredentialSource] = []
    templates: list[Template] = []
    sandboxes: list[StaticSandbox] = []
