"""Per-connection state of the addon and the small helpers its hooks share.

`ConnState` is what one client connection asked for (the CONNECT target), what the proxy
decided for it (traffic rule, client certificate, passthrough) and where it dials.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http

from .. import audit
from ..policy.domains import normalize_host
from ..policy.match import TlsSelection
from .identity import Identity
from .passthrough import TunnelStats
from .tls import UpstreamWatch

Address = tuple[str, int]


@dataclass
class ConnState:
    """What one client connection asked for and what the proxy decided for it."""

    identity: Identity
    host: str  # the CONNECT target, normalised
    port: int
    dial: Address | None  # pinned address (after connectTo and DNS), None if unresolved
    traffic_rule: str | None = None
    tls: TlsSelection | None = None
    tls_error: str | None = None  # upstream TLS failure seen on this connection
    refused: str | None = None
    upstream: UpstreamWatch | None = None
    tunnel: bool = False
    passthrough: TunnelStats | None = None  # set when the connection is relayed untouched
    client: connection.Client | None = None
    close: Callable[[], None] | None = None  # ends a tunnel (revoked sandbox, denied traffic)
    closed_by: str | None = None
    fresh_at: int = -1  # the snapshot generation this connection was last found current in
    plain_dials: dict[Address, Address] = field(default_factory=dict)

    @property
    def sandbox(self) -> str:
        return self.identity.sandbox

    @property
    def dial_ip(self) -> str | None:
        return self.dial[0] if self.dial else None


async def resolve(host: str, port: int) -> str | None:
    """The address the proxy will dial for host; checked by CIDR rules, then pinned."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def connect_event(st: ConnState, decision: str, **kw: Any) -> audit.AuditEvent:
    """An audit event about a whole connection (not one request in it)."""
    return audit.AuditEvent(
        sandbox=st.sandbox,
        method="CONNECT",
        host=st.host,
        port=st.port,
        path="",
        decision=decision,
        **kw,
    )


def sni_refused(st: ConnState, sni: str | None) -> bool:
    """Whether a ClientHello naming `sni` must be refused on this connection (and if so, mark
    it refused and write its audit line).

    Never let SNI and the CONNECT target disagree: rules and traffic policy were checked
    against the target, so a different name inside could borrow its credentials, or pass
    through on the target's word.
    """
    if sni is None:
        return False
    try:
        if normalize_host(sni) == st.host:
            return False
    except ValueError:
        pass
    st.refused = "TLS server name does not match the CONNECT target"
    connect_event(st, "denied", reason="sni_mismatch").emit(None)
    return True


def close_after(flow: http.HTTPFlow) -> None:
    """Close the client connection (and with it its upstream ones) after this response.

    HTTP/2 has no per-response close: such a connection stays until the client ends it,
    though every request on it is still checked against the current snapshot.
    """
    if flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
        flow.response.headers["Connection"] = "close"


def is_loopback(host: str) -> bool:
    if host in ("", "localhost"):
        # mitmproxy's "" means every address: not loopback.
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def header_map(headers: http.Headers) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in headers.items(multi=True):  # type: ignore[no-untyped-call]
        out.setdefault(name.lower(), []).append(value)
    return out
