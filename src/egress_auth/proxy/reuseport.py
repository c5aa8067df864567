"""Let several proxy processes listen on one port (SO_REUSEPORT), for `run --workers N`.

mitmproxy binds its regular-mode listener with a bare `asyncio.start_server(handler, host,
port)`, which cannot share a port. Linux's SO_REUSEPORT can, and then the kernel spreads new
connections over the processes, but only when every socket in the group set the option before
binding, the first one included. So each worker process replaces `listen` of mitmproxy's
`RegularInstance` with one that passes `reuse_port=True`.

Why this and not the alternatives:

* A pre-bound socket handed to every worker (the classic pre-fork accept) needs mitmproxy to
  accept from a socket it did not create; it has no option for that, so it would take an
  override of the same method anyway, and all workers would wake for every connection.
* A front process that accepts and passes file descriptors to workers adds a hop and a
  process to the path of every connection, and its own single core becomes the ceiling.
* A subclass of `RegularInstance` cannot be registered: mitmproxy keys its server classes
  by mode name and refuses a second class for "regular".

The override is one method, in one process that asked for it, and is checked against the
method it replaces (`check`) so that a mitmproxy upgrade that changes it fails loudly at
start-up instead of silently listening without the option.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

EXPECTED_PARAMS = ["self", "host", "port"]


class ReusePortUnsupported(RuntimeError):
    pass


def check() -> None:
    from mitmproxy.proxy import mode_servers

    listen = getattr(mode_servers.RegularInstance, "listen", None)
    if listen is None or list(inspect.signature(listen).parameters) != EXPECTED_PARAMS:
        raise ReusePortUnsupported(
            "this mitmproxy's regular-mode listener has changed; --workers cannot share its port"
        )


def enable() -> None:
    """From now on, this process's regular-mode listeners share their port."""
    from mitmproxy.proxy import mode_servers

    check()
    cls: Any = mode_servers.RegularInstance
    if getattr(cls.listen, "_egress_reuse_port", False):
        return

    async def listen(self: Any, host: str, port: int) -> list[asyncio.Server]:
        # `handle_stream` is what mitmproxy's own listen passes; TCP only (regular mode).
        server = await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)
        return [server]

    listen._egress_reuse_port = True  # type: ignore[attr-defined]
    cls.listen = listen
