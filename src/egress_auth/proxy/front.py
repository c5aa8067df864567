"""The proxy's listener: tunnels are decided and relayed here, everything else goes to mitmproxy.

A connection that will be passed through untouched (`intercept: matching`, no credential
rule of its sandbox could apply to the CONNECT target) needs none of mitmproxy: no HTTP
layer, no TLS layer, no flow objects, no hook dispatch over every addon. Going through them
costs a tunnel about three times its own work, and relaying through mitmproxy's layer stack
moves a large download 64 KiB per event. So `run` listens with this protocol instead of
mitmproxy's stream handler:

1. It buffers the request head. Anything that is not a plain
   `CONNECT host:port HTTP/1.1` (`parse_connect`) whose sandbox, traffic policy and address
   all let it through
   as a tunnel is handed to mitmproxy untouched, bytes replayed, before anything has been
   answered: mitmproxy then parses it again, runs every hook, and answers (407, 403, 502,
   interception) exactly as it would have without this front. Mitmproxy's `block_global` /
   `block_private` checks are honoured the same way.
2. For a tunnel it dials the pinned address (connectTo, then DNS, the one traffic policy
   checked), answers 200 and reads the ClientHello. A server name that differs from the
   CONNECT target gets a TLS handshake_failure alert and an audit line, never a tunnel. A
   stream that is not TLS, or where the server speaks first, is relayed as it is: no rule
   could apply to this host whatever it carries.
3. It relays with asyncio's own transports and flow control (write buffers pause the other
   side's reading), keeps half-closes, closes after mitmproxy's idle timeout (`tcp_timeout`,
   600 s), and writes one `tunnelled` audit line with bytes each way when it ends.

If the dial fails, the connection is handed to mitmproxy too, so a failing upstream gets
mitmproxy's usual answer and hooks. `mitmdump -s addons/egress_auth.py` has no front; there
mitmproxy relays tunnels itself (`ignore_connection` in the addon's `tls_clienthello`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx
from mitmproxy.proxy.layers.tls import parse_client_hello

from ..policy.domains import normalize_host
from ..policy.match import check_traffic
from .conn import ConnState, connect_event, sni_refused
from .identity import Identity, Unauthenticated, identify, still_valid
from .passthrough import TunnelStats

if TYPE_CHECKING:
    from .addon import EgressAuth

log = logging.getLogger("egress_auth")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
# A fatal TLS alert, handshake_failure (40): what a refused ClientHello gets.
HANDSHAKE_FAILURE = b"\x15\x03\x01\x00\x02\x02\x28"
HEAD_LIMIT = 16 * 1024  # a longer CONNECT head is mitmproxy's to refuse
HELLO_LIMIT = 64 * 1024  # a ClientHello spans a few records at most
STREAM_LIMIT = 2**16  # asyncio.start_server's default, which mitmproxy's handler gets
# Per direction, what may wait in the relay for a slow receiver before the sender stops
# being read. asyncio reads up to 256 KiB at a time; with its default of 64 KiB every such
# read paused and resumed the other side, and a 10 MiB download through a tunnel reached
# 63-77% of direct in five runs, against 96-98% in three with this.
RELAY_BUFFER = 256 * 1024
IDLE_TIMEOUT = 600.0  # mitmproxy's TCP idle timeout, when its options do not say

_ids = itertools.count(1)

HEAD, DECIDING, HELLO, RELAY, DONE = range(5)


def unblocked(peer: Any) -> bool:
    """What mitmproxy's `block` addon would let through (else mitmproxy should see it)."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            str(peer[0]).rsplit("%", 1)[0]
        )
    except (ValueError, TypeError, IndexError):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        address = address.ipv4_mapped or address
    if address.is_loopback:
        return True
    opts = ctx.options
    if getattr(opts, "block_private", False) and address.is_private:
        return False
    return not (getattr(opts, "block_global", True) and address.is_global)


# A CONNECT head the front decides on is plain: `CONNECT host:port HTTP/1.1`, then header
# lines `name: value` in visible ASCII, one Proxy-Authorization at most, no body. Anything
# else (and what mitmproxy's parser would refuse is a subset of that) goes to mitmproxy,
# whose parser then has the last word. A strict parser of our own costs about a tenth of
# building mitmproxy's Request for every connection, intercepted ones included.
_REQUEST_LINE = re.compile(rb"CONNECT ([!-~]+):([0-9]{1,5}) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([!-~](?:[ -~]*[!-~])?)?[ \t]*")

Candidate = tuple[Identity, str, int]


def parse_connect(head: bytes) -> tuple[str, int, str | None] | None:
    """(host, port, Proxy-Authorization) of a plain CONNECT head ending in CRLF CRLF, or None."""
    lines = head[:-4].split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    port = int(m[2])
    if not 0 < port < 65536:
        return None
    auth: str | None = None
    for line in lines[1:]:
        h = _HEADER_LINE.fullmatch(line)
        if h is None:
            return None
        name = h[1].lower()
        if name == b"proxy-authorization":
            if auth is not None:
                return None
            auth = (h[2] or b"").decode("ascii")
        elif name in (b"content-length", b"transfer-encoding"):
            return None
    try:
        host = normalize_host(m[1].decode("ascii"))
    except ValueError:
        return None
    return host, port, auth


class Front:
    """The listener's protocol factory: one per listening socket."""

    def __init__(
        self, addon: EgressAuth, handle_stream: StreamHandler, idle: float | None = None
    ) -> None:
        self.addon = addon
        self.handle_stream = handle_stream
        self.idle = idle  # seconds; None: mitmproxy's `tcp_timeout` (600 s in mitmproxy 11)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def idle_timeout(self) -> float:
        if self.idle is not None:
            return self.idle
        return float(getattr(ctx.options, "tcp_timeout", IDLE_TIMEOUT))

    def candidate(self, head: bytes) -> Candidate | None:
        """Who asks for what, if this CONNECT head could be a tunnel of ours; else None, and
        mitmproxy decides (and answers). No await: most connections stop here."""
        parsed = parse_connect(head)
        if parsed is None:
            return None
        host, port, auth = parsed
        snap = self.addon.snapshot
        try:
            identity = identify(auth, snap.identities, required=snap.auth_required)
        except Unauthenticated:
            return None
        if self.addon.intercepts(identity.sandbox, host, port):
            return None  # intercepted (or no policy at all: mitmproxy answers 403)
        return identity, host, port

    async def tunnel(self, candidate: Candidate) -> ConnState | None:
        """Resolve, then decide on the snapshot as it is now: the state of a tunnel of ours,
        or None (mitmproxy decides)."""
        identity, host, port = candidate
        addon = self.addon
        st = await addon.conn_state(identity, host, port)
        snap = addon.snapshot
        if not still_valid(identity, snap.identities, required=snap.auth_required):
            return None
        policy = snap.policies.get(identity.sandbox)
        if policy is None or st.dial is None or addon.intercepts(identity.sandbox, host, port):
            return None
        decision = check_traffic(policy, host, st.port, st.dial_ip)
        if not decision.allowed:
            return None
        st.traffic_rule = decision.rule
        st.tunnel = True
        return st


class FrontProtocol(asyncio.Protocol):
    """One client connection: head, decision, ClientHello, then the relay."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.stage = HEAD
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.st: ConnState | None = None
        self.stats: TunnelStats | None = None
        self.key = ""
        self.task: asyncio.Task[None] | None = None
        self.client_eof = False
        self.up_eof = False
        self.activity = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not unblocked(transport.get_extra_info("peername")):
            self._hand_over()
            return
        self.timer = self.loop.call_later(self.front.idle_timeout(), self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.activity = self.loop.time()
        if self.stage == RELAY:
            assert self.up is not None and self.stats is not None
            self.stats.bytes_up += len(data)
            self.up.transport.write(data)
        elif self.stage == HEAD:
            self._head(data)
        elif self.stage == HELLO:
            self._hello(data)
        else:  # DECIDING: reading is paused; keep what slipped in, in order
            self.buf += data

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.stage == HEAD:
            self._hand_over()  # mitmproxy sees the same EOF after the same bytes
            return True
        if self.stage == RELAY and self.up is not None:
            with contextlib.suppress(OSError):
                self.up.transport.write_eof()
            if self.up_eof:
                self._close()
            return True
        if self.stage != DONE:
            self._close()  # gone before it said anything we could relay
        return False

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and not self.up.transport.is_closing():
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stage == DONE and self.up is None:
            return  # handed over: mitmproxy's protocol has the transport now
        self._finish()

    # ---- the stages ---------------------------------------------------------------------

    def _head(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = min(len(buf), 8)
        if buf[:n] != b"CONNECT "[:n]:
            self._hand_over()
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > HEAD_LIMIT or buf.count(b"\n") != buf.count(b"\r\n"):
                self._hand_over()  # too long, or bare line feeds: mitmproxy's parser decides
            return
        assert self.transport is not None
        try:
            candidate = self.front.candidate(bytes(buf[: end + 4]))
        except Exception as e:
            self._internal_error(e)
            candidate = None
        if candidate is None:
            self._hand_over()
            return
        self.stage = DECIDING
        self.transport.pause_reading()
        self.task = self.loop.create_task(self._decide(candidate, end + 4))

    @staticmethod
    def _internal_error(e: Exception) -> None:
        # Never lose a connection over the fast path: mitmproxy decides instead. The type
        # only: the head holds the client's Proxy-Authorization.
        log.error("egress-auth internal error deciding a tunnel: %s", type(e).__name__)

    async def _decide(self, candidate: Candidate, head_end: int) -> None:
        transport = self.transport
        assert transport is not None
        try:
            st = await self.front.tunnel(candidate)
        except Exception as e:
            self._internal_error(e)
            st = None
        if transport.is_closing():
            return
        if st is None or st.dial is None:
            self._hand_over()
            return
        try:
            _, up = await self.loop.create_connection(lambda: _Upstream(self), *st.dial)
        except Exception:  # whatever failed (OSError mostly), the client must get an answer
            # mitmproxy dials again and answers with its own 502 and hooks.
            self._hand_over()
            return
        if transport.is_closing():
            up.transport.close()
            return
        self.up, self.st = up, st
        transport.write(CONNECT_OK)
        # From here on the connection is a tunnel: audited when it ends, closed on revocation.
        self.stats = st.passthrough = TunnelStats(counted=True)
        st.close = self.abort
        self.key = f"front-{next(_ids)}"
        self.front.addon.conns[self.key] = st
        self.stage = HELLO
        rest = bytes(self.buf[head_end:])
        self.buf.clear()
        transport.resume_reading()
        if rest:
            self._hello(rest)

    def _hello(self, data: bytes) -> None:
        st = self.st
        assert st is not None and self.transport is not None
        buf = self.buf
        buf += data
        if buf[0] != 0x16:  # not a TLS handshake record: relay it as it is
            self._relay()
            return
        try:
            hello = parse_client_hello(bytes(buf))
        except ValueError:
            st.closed_by = "bad_client_hello"
            self._close()
            return
        if hello is None:
            if len(buf) > HELLO_LIMIT:
                st.closed_by = "bad_client_hello"
                self._close()
            return
        if sni_refused(st, hello.sni):
            self.transport.write(HANDSHAKE_FAILURE)
            self._close()
            return
        self._relay()

    def _relay(self, first_down: bytes = b"") -> None:
        st, up, transport = self.st, self.up, self.transport
        assert st is not None and up is not None and transport is not None
        assert self.stats is not None
        self.stage = RELAY
        for t in (transport, up.transport):
            t.set_write_buffer_limits(high=RELAY_BUFFER)
        if self.buf:
            self.stats.bytes_up += len(self.buf)
            up.transport.write(bytes(self.buf))
            self.buf.clear()
        if first_down:
            self.stats.bytes_down += len(first_down)
            transport.write(first_down)

    # ---- endings ------------------------------------------------------------------------

    def _idle_check(self) -> None:
        left = self.activity + self.front.idle_timeout() - self.loop.time()
        if left > 0:
            self.timer = self.loop.call_later(left, self._idle_check)
            return
        self.timer = None
        if self.st is not None and self.st.closed_by is None:
            self.st.closed_by = "idle"
        self.abort()

    def abort(self) -> None:
        """Close both sides now (revoked sandbox, denied traffic, idle)."""
        if self.up is not None:
            self.up.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self.up is not None:
            self.up.transport.close()
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if self.stage == DONE:
            return
        self.stage = DONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.up is not None:
            self.up.transport.close()
        if self.key:
            self.front.addon.conns.pop(self.key, None)
        if self.st is not None and self.stats is not None and not self.st.refused:
            # Every tunnel that got its 200 (an SNI mismatch has its `denied` line instead).
            connect_event(
                self.st,
                "tunnelled",
                traffic_rule=self.st.traffic_rule,
                reason=self.st.closed_by,
                started=self.stats.started,
                extra={"bytesUp": self.stats.bytes_up, "bytesDown": self.stats.bytes_down},
            ).emit(None)

    def _hand_over(self) -> None:
        """Give the connection to mitmproxy as if it had accepted it: same bytes, same EOF."""
        transport = self.transport
        assert transport is not None
        self.stage = DONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, self.front.handle_stream, loop=self.loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buf:
            reader.feed_data(bytes(self.buf))
            self.buf.clear()
        if self.client_eof:
            reader.feed_eof()
        elif not transport.is_reading():
            transport.resume_reading()


class _Upstream(asyncio.Protocol):
    """The upstream side of a tunnel."""

    def __init__(self, client: FrontProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        c = self.client
        c.activity = c.loop.time()
        if c.stage == RELAY:
            assert c.stats is not None and c.transport is not None
            c.stats.bytes_down += len(data)
            c.transport.write(data)
        elif c.stage == HELLO:
            c._relay(first_down=data)  # the server spoke first: not a TLS client's stream
        # else: the client side is gone or closing; nothing to deliver to

    def eof_received(self) -> bool:
        c = self.client
        c.up_eof = True
        if c.stage == RELAY and c.transport is not None:
            with contextlib.suppress(OSError):
                c.transport.write_eof()
            if c.client_eof:
                c._close()
            return True
        c._close()
        return False

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.close()  # after what is still buffered for the client
