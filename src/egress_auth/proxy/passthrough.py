"""Tunnelled (not intercepted) connections: byte counts for their audit line, and closing them
when their sandbox is revoked or their traffic becomes denied.

mitmproxy relays an ignored connection without any hook, so both reach the connection's
transports through the `proxyserver` addon's table of live connections (`connections`,
`transports`, `writer`: public attributes in mitmproxy 11 and 12). If that table is not
there, tunnels still work; their audit line then carries no byte counts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx

log = logging.getLogger("egress_auth")


@dataclass
class TunnelStats:
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    counted: bool = False
    started: float = field(default_factory=time.monotonic)


def _handler(client: connection.Client) -> Any:
    server = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
    connections = getattr(server, "connections", None)
    return connections.get(client.id) if isinstance(connections, dict) else None


def _count_writes(writer: Any, stats: TunnelStats, direction: str) -> bool:
    write = getattr(writer, "write", None)
    if write is None:
        return False

    def counted_write(data: bytes) -> None:
        setattr(stats, direction, getattr(stats, direction) + len(data))
        write(data)

    writer.write = counted_write
    return True


def watch_tunnel(client: connection.Client, server: connection.Server) -> TunnelStats:
    """Count what is relayed from now on, in both directions."""
    stats = TunnelStats()
    handler = _handler(client)
    transports = getattr(handler, "transports", None)
    if transports is None:
        return stats
    to_client = transports.get(client)
    to_server = transports.get(server)
    if to_client is not None and to_server is not None:
        stats.counted = _count_writes(to_client.writer, stats, "bytes_down") and _count_writes(
            to_server.writer, stats, "bytes_up"
        )
    return stats


def close_tunnel(client: connection.Client) -> None:
    """Close a tunnel's sockets; mitmproxy then tears the connection down as usual."""
    transports = getattr(_handler(client), "transports", None)
    for io in list(transports.values()) if transports else []:
        writer = getattr(io, "writer", None)
        if writer is not None:
            with contextlib.suppress(OSError):  # already gone is as good as closed
                writer.close()
