"""The proxy's listening socket: egress-auth's front (`front.py`) and, for `run --workers N`,
a port shared by several processes (SO_REUSEPORT).

mitmproxy binds its regular-mode listener with a bare `asyncio.start_server(handle_stream,
host, port)`. `run` replaces that one method, `RegularInstance.listen`, with one that

* serves connections with the front's protocol, which decides tunnels itself and hands every
  other connection to the same `handle_stream` mitmproxy would have called, and
* with `reuse_port`, sets SO_REUSEPORT. The kernel then spreads new connections over the
  processes, but only when every socket in the group set the option before binding, the
  first one included.

Why an override and not the alternatives:

* A pre-bound socket handed to every worker (the classic pre-fork accept) needs mitmproxy to
  accept from a socket it did not create; it has no option for that, so it would take an
  override of the same method anyway, and all workers would wake for every connection.
* A front process that accepts and passes file descriptors to workers adds a hop and a
  process to the path of every connection, and its own single core becomes the ceiling.
* A subclass of `RegularInstance` cannot be registered: mitmproxy keys its server classes
  by mode name and refuses a second class for "regular".

The override is one method, installed by the process that asked for it, and is checked
against the method it replaces (`check`). If a mitmproxy upgrade changes it, `--workers`
refuses to start, and a single process falls back to mitmproxy's own listener (tunnels are
then relayed by mitmproxy: slower, same decisions).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from typing import TYPE_CHECKING, Any

from .front import Front

if TYPE_CHECKING:
    from .addon import EgressAuth

EXPECTED_PARAMS = ["self", "host", "port"]


class ListenerUnsupported(RuntimeError):
    pass


def check() -> None:
    from mitmproxy.proxy import mode_servers

    listen = getattr(mode_servers.RegularInstance, "listen", None)
    handle = getattr(mode_servers.RegularInstance, "handle_stream", None)
    if (
        listen is None
        or handle is None
        or list(inspect.signature(listen).parameters) != EXPECTED_PARAMS
    ):
        raise ListenerUnsupported(
            "this mitmproxy's regular-mode listener has changed; --workers cannot share its port"
        )


def _free_port(host: str) -> int:
    # Port 0: pick one first, so that IPv4 and IPv6 listeners of host "" share it (as
    # mitmproxy's own listen does).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host and ":" not in host else "", 0))
        return int(s.getsockname()[1])


def install(addon: EgressAuth, reuse_port: bool) -> None:
    """From now on, this process's regular-mode listeners use the front (and share their
    port, with `reuse_port`)."""
    from mitmproxy.proxy import mode_servers

    check()
    cls: Any = mode_servers.RegularInstance

    async def listen(self: Any, host: str, port: int) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        if port == 0:
            port = _free_port(host)
        server = await loop.create_server(
            Front(addon, self.handle_stream), host or None, port, reuse_port=reuse_port or None
        )
        return [server]

    listen._egress_front = True  # type: ignore[attr-defined]
    cls.listen = listen
