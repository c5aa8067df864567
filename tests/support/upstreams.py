"""Real upstream servers on 127.0.0.1 for end-to-end tests.

* :class:`EchoServer` - stdlib threaded HTTP/1.1 (optionally TLS, optionally mTLS) that
  records every request and echoes what it saw as JSON; also echoes WebSocket frames.
* :class:`H2EchoServer` - hypercorn (HTTP/2 + HTTP/1.1 via ALPN) with the same echo.
* :class:`TcpEchoServer` - plain TCP echo, optionally with a banner sent first.

Both bind an ephemeral port, run in daemon threads, and stop within a bounded time so a
misbehaving proxy under test can never hang the suite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from tests.support.pki import IssuedPaths, TestPKI

__all__ = [
    "HOST",
    "EchoServer",
    "H2EchoServer",
    "Recorder",
    "Seen",
    "TcpEchoServer",
    "wait_port",
]

HOST = "127.0.0.1"

# Per-socket-operation timeout inside handlers: long enough for a slow proxy to stream
# a large body, short enough that an abandoned keep-alive connection does not linger.
IO_TIMEOUT = 15.0
READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

ClientCertMode = Literal["none", "required"]
TLSMax = Literal["1.2", "1.3"]

T = TypeVar("T")

_log = logging.getLogger("tests.support.upstreams")


@dataclass(frozen=True)
class Seen:
    """What an upstream observed for one request."""

    method: str
    path: str  # request target exactly as received (origin-form incl. query, or absolute-form)
    headers: list[tuple[str, str]]  # every header, in received order, names as sent
    body_len: int
    body_sha256: str
    client_cert_subject_cn: str | None
    tls_version: str | None  # e.g. "TLSv1.3"; None for plain HTTP or where unknown (H2 server)
    http_version: str = "1.1"

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def header(self, name: str) -> str | None:
        """First value of ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def echo_json(self) -> dict[str, Any]:
        merged: dict[str, str] = {}
        for k, v in self.headers:
            key = k.lower()
            merged[key] = f"{merged[key]}, {v}" if key in merged else v
        return {
            "method": self.method,
            "path": self.path,
            "headers": merged,
            "bodyLen": self.body_len,
            "bodySha256": self.body_sha256,
            "clientCertCn": self.client_cert_subject_cn,
            "tlsVersion": self.tls_version,
            "httpVersion": self.http_version,
        }


class Recorder(Generic[T]):
    """Append-only list shared between server threads and the test thread."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cond = threading.Condition()

    def append(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def snapshot(self) -> list[T]:
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[T]:
        """Block until at least ``count`` items exist; raise TimeoutError otherwise.

        Needed for facts recorded after the client already saw its outcome, e.g. a
        handshake error the server logs after sending the alert.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= count, timeout=timeout):
                raise TimeoutError(f"expected {count} item(s), have {len(self._items)}")
            return list(self._items)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def __getitem__(self, index: int) -> T:
        with self._cond:
            return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self.snapshot())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"Recorder({self.snapshot()!r})"


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts TCP connections; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s: {last}")
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return
        except OSError as exc:
            last = exc
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def _peer_cn(conn: ssl.SSLSocket) -> str | None:
    cert = conn.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _sha256_hex_empty() -> str:
    return hashlib.sha256(b"").hexdigest()


def _ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode()


# --------------------------------------------------------------------------------------
# HTTP/1.1 echo server (stdlib)
# --------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


class _EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, owner: EchoServer, ssl_context: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.ssl_context = ssl_context
        super().__init__((HOST, 0), _EchoHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can
        # stall for seconds on a badly configured box; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.ssl_context is not None:
            # No handshake here: this runs on the accept thread, and one stalled client
            # must not block accepting others. The handler thread does the handshake.
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        # Own the thread bookkeeping (instead of ThreadingMixIn's) so stop() can
        # unblock and join handlers within a deadline.
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"echo-conn-{client_address[1]}",
            daemon=True,
        )
        self.owner._track(request, thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        self.owner._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes are expected in mTLS tests: record, don't spew tracebacks.
        exc = sys.exc_info()[1]
        if exc is not None:
            self.owner.errors.append(exc)
            _log.debug("echo server connection from %s failed: %r", client_address, exc)


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # enables keep-alive and Expect: 100-continue
    timeout = IO_TIMEOUT
    server: _EchoHTTPServer

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            # Raises on a bad/missing client cert; the server's handle_error records it.
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        # Keep pytest output clean; everything interesting is in srv.seen / srv.errors.
        pass

    def handle_one_request(self) -> None:
        # Replaces the stdlib version so that every method (TRACE, PROPFIND, ...) gets
        # echoed instead of a 501 for lack of a do_<METHOD> attribute.
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        except TimeoutError:
            self.close_connection = True
            return
        if len(self.raw_requestline) > MAX_LINE:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        try:
            self._serve()
        except _BadRequest as exc:
            self.owner.errors.append(exc)
            self.send_error(400, str(exc))
        self.wfile.flush()

    @property
    def owner(self) -> EchoServer:
        return self.server.owner

    def _tls_facts(self) -> tuple[str | None, str | None]:
        conn = self.request
        if not isinstance(conn, ssl.SSLSocket):
            return None, None
        return conn.version(), _peer_cn(conn)

    def _is_websocket_upgrade(self) -> bool:
        upgrade = self.headers.get("Upgrade", "")
        return (
            self.command == "GET"
            and "websocket" in upgrade.lower()
            and self.headers.get("Sec-WebSocket-Key") is not None
        )

    def _serve(self) -> None:
        tls_version, cn = self._tls_facts()
        websocket = self._is_websocket_upgrade()
        if websocket:
            body_len, digest = 0, _sha256_hex_empty()
        else:
            body_len, digest = self._read_body()
        seen = Seen(
            method=self.command,
            path=self.path,
            headers=[(k, v) for k, v in self.headers.items()],
            body_len=body_len,
            body_sha256=digest,
            client_cert_subject_cn=cn,
            tls_version=tls_version,
            http_version=self.request_version.removeprefix("HTTP/"),
        )
        self.owner.seen.append(seen)
        if websocket:
            self._websocket()
            return
        payload = json.dumps(seen.echo_json()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    # -- bodies -------------------------------------------------------------------------

    def _read_body(self) -> tuple[int, str]:
        """Consume the request body, hashing as we go so 10+ MB uploads stay cheap."""
        hasher = hashlib.sha256()
        te = self.headers.get_all("Transfer-Encoding") or []
        codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
        if codings:
            # RFC 9112 6.3: with Transfer-Encoding present, Content-Length is ignored.
            if codings[-1] != "chunked":
                raise _BadRequest(f"unsupported transfer-encoding {codings!r}")
            return self._read_chunked(hasher), hasher.hexdigest()
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 0, hasher.hexdigest()
        values = {v.strip() for v in ",".join(lengths).split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _BadRequest(f"bad content-length {lengths!r}")
        length = int(next(iter(values)))
        self._read_exact(length, hasher)
        return length, hasher.hexdigest()

    def _read_exact(self, length: int, hasher: Any) -> None:
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, READ_CHUNK))
            if not chunk:
                raise _BadRequest(f"body truncated, {remaining} byte(s) missing")
            hasher.update(chunk)
            remaining -= len(chunk)

    def _read_chunked(self, hasher: Any) -> int:
        total = 0
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line.endswith(b"\n"):
                raise _BadRequest("truncated chunk-size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(f"bad chunk size {size_text!r}") from None
            if size == 0:
                break
            self._read_exact(size, hasher)
            total += size
            if self.rfile.readline(MAX_LINE) not in (b"\r\n", b"\n"):
                raise _BadRequest("missing CRLF after chunk data")
        # Trailer section ends with an empty line.
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                raise _BadRequest("connection closed inside chunked trailers")
            if line in (b"\r\n", b"\n"):
                return total

    # -- websocket ----------------------------------------------------------------------

    def _websocket(self) -> None:
        key = (self.headers.get("Sec-WebSocket-Key") or "").strip()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", _ws_accept(key))
        protocols = self.headers.get("Sec-WebSocket-Protocol")
        if protocols:
            # Some clients abort when none of their offered subprotocols is chosen.
            self.send_header("Sec-WebSocket-Protocol", protocols.split(",")[0].strip())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True  # no HTTP after the upgrade

        ws = WSConnection(ConnectionType.SERVER)
        while ws.state is not ConnectionState.CLOSED:
            try:
                # read1: use what the request parser already buffered, then one recv.
                data = self.rfile.read1(READ_CHUNK)
            except TimeoutError:
                return
            ws.receive_data(data or None)
            out = b""
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    out += ws.send(
                        Message(data=event.data, message_finished=event.message_finished)
                    )
                elif isinstance(event, Ping) or (
                    # Answer the peer's close; a synthetic 1006 on EOF needs no reply.
                    isinstance(event, CloseConnection)
                    and ws.state is ConnectionState.REMOTE_CLOSING
                ):
                    out += ws.send(event.response())
            if out:
                self.wfile.write(out)
            if not data:
                return


class EchoServer:
    """Threaded HTTP/1.1 echo upstream; see module docstring.

    ``tls_max="1.2"`` pins TLS 1.2 (client-cert rejection happens inside the handshake);
    ``tls_max="1.3"`` pins exactly TLS 1.3 (rejection surfaces after the client's
    handshake, on its first read), so the test really covers that path.
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        tls: bool = True,
        client_cert: ClientCertMode = "none",
        tls_max: TLSMax | None = None,
        names: Sequence[str] = ("localhost",),
    ) -> None:
        if client_cert not in ("none", "required"):
            raise ValueError(f"client_cert must be 'none' or 'required', not {client_cert!r}")
        if not tls and (client_cert != "none" or tls_max is not None):
            raise ValueError("client_cert/tls_max need tls=True")
        self.pki = pki
        self.tls = tls
        self.client_cert = client_cert
        self.tls_max = tls_max
        self.names = list(names)
        self.host = HOST
        self.seen: Recorder[Seen] = Recorder()
        self.errors: Recorder[BaseException] = Recorder()
        self.cert_paths: IssuedPaths | None = None
        self._ssl_context = self._make_ssl_context() if tls else None
        self._httpd: _EchoHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[Any, threading.Thread] = {}
        self._conns_lock = threading.Lock()

    def _make_ssl_context(self) -> ssl.SSLContext:
        issued = self.pki.server(self.names)
        self.cert_paths = issued.write(self.pki.directory, self.pki.unique_stem("echo-server"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_max == "1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        elif self.tls_max == "1.3":
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # Send leaf + intermediate; clients only trust the root.
        ctx.load_cert_chain(self.cert_paths.chain, self.cert_paths.key)
        # Only HTTP/1.1 here, so a client offering h2 cleanly falls back.
        ctx.set_alpn_protocols(["http/1.1"])
        if self.client_cert == "required":
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.pki.root_pem_path))
        return ctx

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._httpd = _EchoHTTPServer(self, self._ssl_context)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # short poll => shutdown() returns quickly
            name=f"echo-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        deadline = time.monotonic() + timeout
        httpd.shutdown()  # bounded by poll_interval; the accept loop never blocks long
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._conns_lock:
            conns = dict(self._conns)
        for conn in conns:
            # Plain socket shutdown on the fd (bypassing SSLSocket.shutdown, which would
            # tear down the SSL object under a concurrently reading handler) wakes any
            # handler blocked in recv so it exits now rather than after IO_TIMEOUT.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def _track(self, conn: Any, thread: threading.Thread) -> None:
        with self._conns_lock:
            self._conns[conn] = thread

    def _untrack(self, conn: Any) -> None:
        with self._conns_lock:
            self._conns.pop(conn, None)


# --------------------------------------------------------------------------------------
# HTTP/2 echo server (hypercorn)
# --------------------------------------------------------------------------------------

# How long a closing TLS connection may wait for the peer's close_notify. asyncio's
# default is 30 s, so one idle keep-alive client (httpx never reads while idle) would
# hold hypercorn's graceful shutdown - and therefore stop() - for half a minute.
H2_SSL_SHUTDOWN_TIMEOUT = 1.0


class _BoundedShutdownLoop(asyncio.SelectorEventLoop):
    """Event loop used only by the H2EchoServer thread (no global asyncio patching).

    hypercorn calls asyncio.start_server without ssl_shutdown_timeout; this injects one.
    """

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_shutdown_timeout", H2_SSL_SHUTDOWN_TIMEOUT)
        return await super().create_server(*args, **kwargs)


_Scope = dict[str, Any]
_Message = dict[str, Any]


class H2EchoServer:
    """Hypercorn-based HTTPS echo upstream offering ALPN h2 and http/1.1.

    ``Seen.tls_version`` and ``client_cert_subject_cn`` are None here: ASGI does not
    expose them and the H2 tests do not need them. ``Seen.http_version`` is "2" or "1.1".
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        names: Sequence[str] = ("localhost",),
        startup_timeout: float = 10.0,
    ) -> None:
        self.pki = pki
        self.names = list(names)
        self.host = HOST
        self.startup_timeout = startup_timeout
        self.seen: Recorder[Seen] = Recorder()
        self.errors: Recorder[BaseException] = Recorder()
        issued = pki.server(self.names)
        self.cert_paths = issued.write(pki.directory, pki.unique_stem("h2-server"))
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._loop_ready = threading.Event()
        self._stopping = False

    def start(self) -> Self:
        if self._thread is not None:
            return self
        # Bind here and hand hypercorn the fd: the port is known up front and there is
        # no window in which another process could grab a "probed free" port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, 0))
            self._port = int(sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn now owns (and closes) the fd
        config.certfile = str(self.cert_paths.chain)
        config.keyfile = str(self.cert_paths.key)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.graceful_timeout = 1.0  # keeps stop() short even with open connections
        config.ssl_handshake_timeout = 5.0  # a stalled handshake should not outlive a test
        config.errorlog = logging.getLogger("tests.support.h2echo")
        config.accesslog = None

        self._stopping = False
        self._loop_ready.clear()
        # Created before the thread starts so stop() can always signal it; asyncio.Event
        # binds to a loop lazily (3.10+), i.e. to the server loop on first wait().
        self._shutdown = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, args=(config,), name=f"h2-echo-{self._port}", daemon=True
        )
        self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                errors = self.errors.snapshot()
                raise RuntimeError(f"hypercorn exited during start-up: {errors!r}")
            try:
                wait_port(HOST, self.port, timeout=0.2)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"hypercorn did not listen on {self.port} in {self.startup_timeout}s")

    def _run(self, config: HypercornConfig) -> None:
        loop = _BoundedShutdownLoop()
        loop.set_exception_handler(self._on_loop_exception)
        self._loop = loop
        self._loop_ready.set()
        assert self._shutdown is not None
        try:
            loop.run_until_complete(
                hypercorn_serve(
                    self._app,  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=self._shutdown.wait,
                )
            )
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            # Like asyncio.run's cleanup, but bounded: leftovers (e.g. a connection still
            # in its TLS handshake) are cancelled instead of "destroyed but pending".
            with contextlib.suppress(Exception):
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Route asyncio's "unhandled exception" reports into srv.errors instead of stderr.
        # While stopping, failures are the expected result of cutting connections off.
        # Peers vanishing mid-handshake (wait_port's probe, a client giving up) surface here
        # only in asyncio debug mode (python -X dev); they say nothing about the server.
        exc = context.get("exception")
        if self._stopping or isinstance(exc, ConnectionError | ssl.SSLEOFError):
            _log.debug("h2 echo server: %s %r", context.get("message"), exc)
            return
        self.errors.append(exc if exc is not None else RuntimeError(str(context.get("message"))))

    def stop(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        if self._loop_ready.wait(timeout=min(timeout, 1.0)) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                assert self._shutdown is not None
                self._loop.call_soon_threadsafe(self._shutdown.set)
        thread.join(timeout)
        if thread.is_alive():
            self.errors.append(TimeoutError(f"hypercorn thread still running after {timeout}s"))
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    # -- ASGI app -----------------------------------------------------------------------

    async def _app(self, scope: _Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message: _Message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    def _seen(self, scope: _Scope, body_len: int, digest: str) -> Seen:
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        return Seen(
            method=scope.get("method", "GET"),
            path=target.decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body_len=body_len,
            body_sha256=digest,
            client_cert_subject_cn=None,
            tls_version=None,
            http_version=str(scope.get("http_version", "1.1")),
        )

    async def _http(self, scope: _Scope, receive: Any, send: Any) -> None:
        hasher = hashlib.sha256()
        total = 0
        while True:
            message: _Message = await receive()
            if message["type"] == "http.disconnect":
                return
            body: bytes = message.get("body", b"")
            hasher.update(body)
            total += len(body)
            if not message.get("more_body", False):
                break
        seen = self._seen(scope, total, hasher.hexdigest())
        self.seen.append(seen)
        payload = json.dumps(seen.echo_json()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if seen.method == "HEAD" else payload}
        )

    async def _websocket(self, scope: _Scope, receive: Any, send: Any) -> None:
        self.seen.append(self._seen(scope, 0, _sha256_hex_empty()))
        while True:
            message: _Message = await receive()
            kind = message["type"]
            if kind == "websocket.connect":
                await send({"type": "websocket.accept"})
            elif kind == "websocket.receive":
                if message.get("text") is not None:
                    await send({"type": "websocket.send", "text": message["text"]})
                else:
                    await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
            elif kind == "websocket.disconnect":
                return


class TcpEchoServer:
    """Plain TCP on 127.0.0.1: echoes every byte back, half-closes after the client does.

    With ``banner``, it first sends that line unasked, as SMTP or SSH servers do, so a test
    can check that a proxy relays a server that speaks first.
    """

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.host = HOST
        self._sock = socket.create_server((HOST, 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tcp-echo", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        with conn, contextlib.suppress(OSError):
            if self.banner:
                conn.sendall(self.banner)
            while chunk := conn.recv(READ_CHUNK):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
