"""The tunnel relay of `run`'s front (`proxy/front.py`): what it must carry, byte for byte,
and what it must leave to mitmproxy."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pki import TestPKI
from tests.support.policies import credential_rule, header_binding, template
from tests.support.proxyproc import ProxyProcess, free_port, read_head
from tests.support.upstreams import EchoServer, TcpEchoServer

from .test_admin_api import envelope_ok, headers_source

pytestmark = pytest.mark.e2e

TOKEN = "relay_tok_Qq55Ww66"
BIG = 8 * 1024 * 1024 + 123  # not a multiple of any buffer size


def connect(
    proxy: ProxyProcess, target: str, extra: bytes = b""
) -> tuple[socket.socket, bytes, bytes]:
    """CONNECT target (plus `extra` in the same write); the reply head and what followed."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    host = target.rsplit(":", 1)[0]
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() + extra)
    head, rest = read_head(sock)
    return sock, head, rest


class Ctx:
    def __init__(self, pki: TestPKI, proxy: ProxyProcess, echo: EchoServer) -> None:
        self.pki, self.proxy, self.echo = pki, proxy, echo

    def connect(self, target: str, extra: bytes = b"") -> tuple[socket.socket, bytes, bytes]:
        return connect(self.proxy, target, extra)

    def tunnel_line(self, host: str, since: int) -> dict[str, object]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.proxy.audit_lines()[since:]:
                if line.get("decision") == "tunnelled" and line.get("host") == host:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no tunnelled audit line for {host}")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("relay")
    pki = TestPKI.create(base / "pki")
    dead = free_port()  # nothing listens there
    with (
        EchoServer(pki, names=["big.example.test", "ruled.example.test"]) as echo,
        TcpEchoServer() as raw,
        TcpEchoServer(banner=b"220 banner.example.test ready\r\n") as banner,
    ):
        config = {
            "proxy": {
                "upstreamCaFile": str(pki.root_pem_path),
                "connectTo": {
                    "big.example.test:443": f"127.0.0.1:{echo.port}",
                    "ruled.example.test:443": f"127.0.0.1:{echo.port}",
                    "raw.example.test:7000": f"127.0.0.1:{raw.port}",
                    "banner.example.test:2525": f"127.0.0.1:{banner.port}",
                    "dead.example.test:443": f"127.0.0.1:{dead}",
                },
            },
            "sources": [headers_source("tok", TOKEN)],
            "templates": [
                template(
                    "default",
                    [credential_rule("ruled", "b", ["ruled.example.test"])],
                    [header_binding("b", "tok")],
                )
            ],
        }
        with ProxyProcess(base / "proxy", config) as proxy:
            yield Ctx(pki, proxy, echo)


def test_a_large_upload_arrives_byte_for_byte_and_is_counted(ctx: Ctx) -> None:
    body = os.urandom(BIG)
    since = len(ctx.proxy.audit_lines())
    sock, head, _ = ctx.connect("big.example.test:443")
    assert head.startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(ctx.pki.root_pem_path)).wrap_socket(
        sock, server_hostname="big.example.test"
    )
    tls.sendall(
        b"POST /upload HTTP/1.1\r\nHost: big.example.test\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    tls.close()
    echoed = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert echoed["bodyLen"] == BIG
    assert echoed["bodySha256"] == hashlib.sha256(body).hexdigest()
    line = ctx.tunnel_line("big.example.test", since)
    assert isinstance(line["bytesUp"], int) and line["bytesUp"] > BIG  # plus TLS framing
    assert isinstance(line["bytesDown"], int) and len(answer) < line["bytesDown"] < 64 * 1024


def test_a_stream_that_is_not_tls_is_relayed_both_ways_with_half_close(ctx: Ctx) -> None:
    data = os.urandom(BIG)
    since = len(ctx.proxy.audit_lines())
    sock, head, rest = ctx.connect("raw.example.test:7000")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""

    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # half-close: the echo still answers everything

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    sock.settimeout(15)
    while chunk := sock.recv(1 << 20):
        got += chunk
    sender.join(15)
    sock.close()
    assert len(got) == BIG and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    line = ctx.tunnel_line("raw.example.test", since)
    assert line["bytesUp"] == BIG and line["bytesDown"] == BIG
    assert line["port"] == 7000 and line["sandbox"] == "default"


def test_a_server_that_speaks_first_is_relayed(ctx: Ctx) -> None:
    sock, head, rest = ctx.connect("banner.example.test:2525")
    assert head.startswith(b"HTTP/1.1 200")
    sock.settimeout(5)
    banner = rest
    while not banner.endswith(b"\r\n"):
        banner += sock.recv(4096)
    assert banner == b"220 banner.example.test ready\r\n"
    sock.sendall(b"QUIT\r\n")
    assert sock.recv(4096) == b"QUIT\r\n"
    sock.close()


def test_a_client_hello_sent_with_the_connect_is_not_lost(ctx: Ctx) -> None:
    # Some clients do not wait for the 200 before starting TLS.
    tls_ctx = ssl.create_default_context(cafile=str(ctx.pki.root_pem_path))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_ctx.wrap_bio(incoming, outgoing, server_hostname="big.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock, head, rest = ctx.connect("big.example.test:443", extra=outgoing.read())
    assert head.startswith(b"HTTP/1.1 200")
    incoming.write(rest)
    sock.settimeout(5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    issuer = tls.getpeercert()["issuer"]
    assert "mitmproxy" not in str(issuer)  # the upstream's own certificate: tunnelled
    sock.close()


def test_a_failed_dial_gets_mitmproxys_answer(ctx: Ctx) -> None:
    sock, head, _ = ctx.connect("dead.example.test:443")
    sock.close()
    assert head.startswith(b"HTTP/1.1 502"), head


def test_a_ruled_host_is_still_intercepted_after_the_front_hands_it_over(ctx: Ctx) -> None:
    sock, head, _ = ctx.connect("ruled.example.test:443")
    assert head.startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(ctx.proxy.ca_path)).wrap_socket(
        sock, server_hostname="ruled.example.test"
    )
    n = len(ctx.echo.seen)
    tls.sendall(b"GET /r HTTP/1.1\r\nHost: ruled.example.test\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    tls.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert ctx.echo.seen.snapshot()[n].header("Authorization") == f"Bearer {TOKEN}"


def test_a_malformed_connect_gets_mitmproxys_400(ctx: Ctx) -> None:
    sock = socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10)
    sock.sendall(b"CONNECT big.example.test HTTP/1.1\r\n\r\n")  # no port
    assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    sock.close()


def test_the_sandbox_token_never_reaches_the_logs_through_the_front(ctx: Ctx) -> None:
    with ctx.proxy.admin() as a:
        sb = envelope_ok(
            a.post("/api/v1/sandboxes", json={"id": "front-leak", "template": "default"}), 201
        )
    token = sb["token"]
    auth = base64.b64encode(f"front-leak:{token}".encode()).decode()
    heads = [
        # A tunnel the front relays itself.
        f"CONNECT raw.example.test:7000 HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
        # Heads the front's parser refuses, with the credential in them: mitmproxy decides.
        f"CONNECT raw.example.test:7000 HTTP/1.1\r\nProxy-Authorization: Basic {auth}\r\n"
        "no colon here\r\n\r\n",
        f"CONNECT raw.example.test:7000 HTTP/1.1\r\nProxy-Authorization Basic {auth}\r\n\r\n",
        f"CONNECT raw.example.test:7000 HTTP/1.1\r\nProxy-Authorization: Basic {auth}x\r\n\r\n",
    ]
    answers = []
    for head in heads:
        sock = socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10)
        sock.sendall(head.encode())
        answers.append(read_head(sock)[0][:12])
        sock.close()
    assert answers[0] == b"HTTP/1.1 200"
    assert answers[1] == answers[2] == b"HTTP/1.1 400"
    assert answers[3] == b"HTTP/1.1 407"
    # Closed right after its 200, before a byte went through: still one audit line.
    line = ctx.proxy.wait_audit(
        lambda d: d.get("sandbox") == "front-leak" and d.get("decision") == "tunnelled"
    )
    assert line["bytesUp"] == line["bytesDown"] == 0
    out = ctx.proxy.output()
    for secret in (token, auth):
        assert secret not in out
        assert all(secret not in json.dumps(line) for line in ctx.proxy.audit_lines())


def test_a_tunnel_open_at_shutdown_still_gets_its_audit_line(tmp_path: Path) -> None:
    with TcpEchoServer() as raw:
        config = {
            "proxy": {"connectTo": {"raw.example.test:7000": f"127.0.0.1:{raw.port}"}},
            "templates": [template("default", [], [])],
        }
        proxy = ProxyProcess(tmp_path / "proxy", config).start()
        try:
            sock, head, _ = connect(proxy, "raw.example.test:7000")
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(b"hi")
            assert sock.recv(10) == b"hi"
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(20) == 0
            sock.settimeout(5)
            assert sock.recv(10) == b""  # the client sees the end, not a hang
            sock.close()
        finally:
            proxy.stop()
        line = next(d for d in proxy.audit_lines() if d.get("decision") == "tunnelled")
        assert line["reason"] == "shutdown" and line["bytesUp"] == line["bytesDown"] == 2
