"""Loopback HTTPS upstreams for the benchmark: a keep-alive echo and an mTLS one.

One process, one event loop (uvloop when installed), two listening sockets on 127.0.0.1:

* ``echo``: TLS, HTTP/1.1 keep-alive; answers every request with a fixed small body that says
  whether an ``Authorization: Bearer bench-...`` header arrived (so the benchmark can check
  that egress-auth really injected on every request it counted).
* ``mtls``: the same, but the TLS handshake requires a client certificate issued under the
  benchmark's throwaway root.

Both also answer ``GET /v1/download`` with a fixed body of ``--download-bytes`` (10 MiB), for the
throughput workload. Every answer carries ``X-Bench-Auth`` and ``X-Bench-Cert`` headers, so the
load generator can check injection without reading a large body.

Written with bare ``asyncio.Protocol`` callbacks, not the test suite's threaded stdlib echo
server, so that it is never the bottleneck (``run.py`` measures both; see README).

Usage (run.py does this)::

    python bench/upstream.py --chain C --key K --client-ca ROOT [--max-seconds 1800]

prints one JSON line ``{"echo": PORT, "mtls": PORT, "loop": "uvloop"}`` and serves until
its stdin closes, SIGTERM, or ``--max-seconds`` pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys

HOST = "127.0.0.1"
MAX_HEAD = 64 * 1024


def _head(auth: bool, cert: bool, length: int, ctype: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype
        + b"\r\nX-Bench-Auth: " + (b"true" if auth else b"false")
        + b"\r\nX-Bench-Cert: " + (b"true" if cert else b"false")
        + b"\r\nContent-Length: " + str(length).encode()
        + b"\r\n\r\n"
    )  # fmt: skip


def _small(auth: bool, cert: bool) -> bytes:
    body = b'{"auth":%s,"cert":%s}' % (
        b"true" if auth else b"false",
        b"true" if cert else b"false",
    )
    return _head(auth, cert, len(body), b"application/json") + body


RESPONSES = {(a, c): _small(a, c) for a in (False, True) for c in (False, True)}
AUTH_MARK = b"\r\nauthorization: bearer bench-"
DOWNLOAD = b"get /v1/download "
# (auth, cert) -> (head, body); filled by serve() once --download-bytes is known.
DOWNLOADS: dict[tuple[bool, bool], tuple[bytes, bytes]] = {}


class Http(asyncio.Protocol):
    """GET-only HTTP/1.1: parse heads, answer each at once, keep the connection open."""

    def __init__(self, mtls: bool) -> None:
        self.mtls = mtls
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            buf = buf[end + 4 :]
            if head.startswith(DOWNLOAD):
                out.extend(DOWNLOADS[(AUTH_MARK in head, self.mtls)])
            else:
                out.append(RESPONSES[(AUTH_MARK in head, self.mtls)])
            if b"\r\nconnection: close" in head:
                close = True
                break
        self.buf = buf
        if out:
            if len(out) == 1 or sum(map(len, out)) > MAX_HEAD:
                for chunk in out:  # no copy of a download's body
                    self.transport.write(chunk)
            else:
                self.transport.write(b"".join(out))
        if close or len(self.buf) > MAX_HEAD:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def server_context(chain: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    # A bare server context: with create_default_context(CLIENT_AUTH) the system roots would
    # be loaded too, and a server asking for a client certificate would list all of their
    # names in its CertificateRequest, making every mTLS handshake cost far more than needed.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    blob = bytes(range(256)) * (args.download_bytes // 256) + b"x" * (args.download_bytes % 256)
    for key in RESPONSES:
        DOWNLOADS[key] = (_head(*key, len(blob), b"application/octet-stream"), blob)
    echo = await loop.create_server(
        lambda: Http(False), HOST, 0, ssl=server_context(args.chain, args.key, None), backlog=1024
    )
    mtls = await loop.create_server(
        lambda: Http(True),
        HOST,
        0,
        ssl=server_context(args.chain, args.key, args.client_ca),
        backlog=1024,
    )
    ports = {
        "echo": echo.sockets[0].getsockname()[1],
        "mtls": mtls.sockets[0].getsockname()[1],
        "loop": type(loop).__module__.split(".")[0],
    }
    print(json.dumps(ports), flush=True)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    # Stop when the parent goes away (its end of our stdin closes).
    with contextlib.suppress(Exception):
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def watch_stdin() -> None:
            while await reader.read(4096):
                pass
            done.set()

        watcher = asyncio.ensure_future(watch_stdin())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), args.max_seconds)
    echo.close()
    mtls.close()
    with contextlib.suppress(NameError):
        watcher.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chain", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--download-bytes", type=int, default=10 * 1024 * 1024)
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve(args))
            return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
