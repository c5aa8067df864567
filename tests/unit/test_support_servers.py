"""Direct (proxy-less) checks that the e2e test upstreams and PKI behave as advertised."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Literal

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)

from tests.support.pki import TestPKI
from tests.support.upstreams import HOST, EchoServer, H2EchoServer, wait_port

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


def client_context(pki: TestPKI, cert: Literal["good", "other", "none"] = "none") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.root_pem_path))
    if cert != "none":
        issuer: Literal["intermediate", "other"] = "intermediate" if cert == "good" else "other"
        issued = pki.client(f"{cert}-client", issuer=issuer)
        paths = issued.write(pki.directory, pki.unique_stem(f"{cert}-client"))
        # The chain file carries leaf + intermediate; the server trusts only the root.
        ctx.load_cert_chain(paths.chain, paths.key)
    return ctx


def client(
    pki: TestPKI, cert: Literal["good", "other", "none"] = "none", http2: bool = False
) -> httpx.Client:
    return httpx.Client(verify=client_context(pki, cert), timeout=TIMEOUT, http2=http2)


# -- PKI --------------------------------------------------------------------------------


def test_pki_shapes(pki: TestPKI) -> None:
    server = pki.server(["api.example.test"])
    leaf = x509.load_pem_x509_certificate(server.cert_pem)
    chain = x509.load_pem_x509_certificates(server.chain_pem)
    assert len(chain) == 2 and chain[0] == leaf
    assert "egress-auth test intermediate" in chain[1].subject.rfc4514_string()
    assert leaf.issuer == chain[1].subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert b"egress-auth test root" not in server.chain_pem  # root never in chain PEM text
    assert pki.root_pem_path.read_bytes() == pki.root_pem
    assert pki.root_pem != pki.other_root_pem

    from_root = pki.client("direct", issuer="root")
    assert from_root.chain_pem == from_root.cert_pem


# -- HTTP/1.1 echo ----------------------------------------------------------------------


def test_echo_records_headers_in_order(pki: TestPKI) -> None:
    with EchoServer(pki, names=["api.example.test"]) as srv, client(pki) as c:
        r = c.post(
            f"{srv.url}/hello?x=1&y=%2F",
            headers=[("X-First", "a"), ("X-Dup", "1"), ("X-Dup", "2")],
            content=b"payload",
        )
        assert r.status_code == 200
        assert r.http_version == "HTTP/1.1"
        body = r.json()
        assert body["method"] == "POST"
        assert body["path"] == "/hello?x=1&y=%2F"
        assert body["headers"]["x-dup"] == "1, 2"
        assert body["bodyLen"] == 7
        assert body["tlsVersion"] == "TLSv1.3"
        assert body["clientCertCn"] is None

        # Keep-alive: the second request reuses the connection and is recorded too.
        assert c.get(f"{srv.url}/second").status_code == 200

    first, second = srv.seen.snapshot()
    names = [k.lower() for k, _ in first.headers]
    assert names.index("x-first") < names.index("x-dup")
    assert first.header_values("x-dup") == ["1", "2"]
    assert first.body_sha256 == hashlib.sha256(b"payload").hexdigest()
    assert second.path == "/second"
    assert not srv.errors


def test_chunked_upload_length_and_digest(pki: TestPKI) -> None:
    data = os.urandom(5 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 100_000):  # odd size: chunk edges != read edges
            yield data[i : i + 100_000]

    with EchoServer(pki) as srv, client(pki) as c:
        r = c.put(f"{srv.url}/upload", content=chunks())
        assert r.status_code == 200
    (seen,) = srv.seen.snapshot()
    assert seen.header("transfer-encoding") == "chunked"
    assert seen.body_len == len(data)
    assert seen.body_sha256 == hashlib.sha256(data).hexdigest()


def test_plain_http_trace_and_raw_target(pki: TestPKI) -> None:
    with EchoServer(pki, tls=False) as srv:
        conn = http.client.HTTPConnection(HOST, srv.port, timeout=TIMEOUT)
        try:
            conn.request("TRACE", "/t%20x?q")
            r = conn.getresponse()
            assert r.status == 200
            r.read()
            # Absolute-form target is recorded verbatim (what a forward proxy would see).
            conn.request("GET", "http://example.test/abs", headers={"Host": "example.test"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    trace, absolute = srv.seen.snapshot()
    assert (trace.method, trace.path, trace.tls_version) == ("TRACE", "/t%20x?q", None)
    assert absolute.path == "http://example.test/abs"


# -- mTLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_mtls_accepts_good_chain(pki: TestPKI, tls_max: Literal["1.2", "1.3"]) -> None:
    with EchoServer(pki, client_cert="required", tls_max=tls_max) as srv, client(pki, "good") as c:
        body = c.get(f"{srv.url}/mtls").json()
    assert body["clientCertCn"] == "good-client"
    assert body["tlsVersion"] == f"TLSv{tls_max}"
    assert srv.seen[0].client_cert_subject_cn == "good-client"


@pytest.mark.parametrize("cert", ["other", "none"])
@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_mtls_rejects_bad_or_missing_cert(
    pki: TestPKI, tls_max: Literal["1.2", "1.3"], cert: Literal["other", "none"]
) -> None:
    with EchoServer(pki, client_cert="required", tls_max=tls_max) as srv, client(pki, cert) as c:
        # TLS 1.2 fails inside the handshake (ConnectError); TLS 1.3 completes the client
        # side of the handshake and the alert shows up on the first read (ReadError etc.).
        with pytest.raises(httpx.TransportError):
            c.get(f"{srv.url}/mtls")
        errors = srv.errors.wait_for(1, timeout=TIMEOUT)
    assert isinstance(errors[0], ssl.SSLError), errors
    assert not srv.seen


def test_mtls_tls13_failure_is_after_handshake(pki: TestPKI) -> None:
    # Pins the premise behind tls_max="1.3": the client's handshake succeeds and only the
    # first read fails, which is what a proxy must cope with.
    with EchoServer(pki, client_cert="required", tls_max="1.3") as srv:
        ctx = client_context(pki, "other")
        with (
            socket.create_connection((HOST, srv.port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.3"
            # Depending on timing the server's alert+close lands before our write (EOF on
            # send) or after it (alert on recv); either way the first I/O fails.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(1024)
        srv.errors.wait_for(1, timeout=TIMEOUT)
    assert not srv.seen


# -- HTTP/2 -------------------------------------------------------------------------------


def test_h2_server_speaks_http2(pki: TestPKI) -> None:
    with H2EchoServer(pki, names=["api.example.test"]) as srv, client(pki, http2=True) as c:
        r = c.post(f"{srv.url}/h2?z=9", content=b"x" * 70_000, headers={"X-H2": "yes"})
        assert r.status_code == 200
        assert r.http_version == "HTTP/2"
        body = r.json()
        assert body["httpVersion"] == "2"
        assert body["headers"]["x-h2"] == "yes"
        assert body["bodyLen"] == 70_000
    (seen,) = srv.seen.snapshot()
    assert (seen.method, seen.path, seen.http_version) == ("POST", "/h2?z=9", "2")


def test_h2_server_still_speaks_http11(pki: TestPKI) -> None:
    with H2EchoServer(pki) as srv, client(pki) as c:
        r = c.get(f"{srv.url}/one")
        assert r.http_version == "HTTP/1.1"
    assert srv.seen[0].http_version == "1.1"


# -- WebSocket ----------------------------------------------------------------------------


def test_websocket_upgrade_and_echo(pki: TestPKI) -> None:
    with EchoServer(pki, names=["ws.example.test"]) as srv:
        ctx = client_context(pki)
        with (
            socket.create_connection((HOST, srv.port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="ws.example.test") as sock,
        ):
            ws = WSConnection(ConnectionType.CLIENT)
            sock.sendall(ws.send(Request(host="ws.example.test", target="/chat?room=1")))
            deadline = time.monotonic() + TIMEOUT

            events: list[object] = []

            def pump(done: Callable[[], bool]) -> None:
                while not done():
                    assert time.monotonic() < deadline, events
                    ws.receive_data(sock.recv(65536) or None)
                    events.extend(ws.events())

            # wsproto only allows frames once the 101 has been processed.
            pump(lambda: bool(events))
            sock.sendall(ws.send(Message(data="hello")))
            sock.sendall(ws.send(Message(data=b"\x00\x01bin")))
            pump(lambda: sum(isinstance(e, TextMessage | BytesMessage) for e in events) >= 2)
            assert isinstance(events[0], AcceptConnection)
            assert [e.data for e in events if isinstance(e, TextMessage | BytesMessage)] == [
                "hello",
                b"\x00\x01bin",
            ]

            sock.sendall(ws.send(CloseConnection(code=1000)))
            pump(lambda: any(isinstance(e, CloseConnection) for e in events))
            assert any(isinstance(e, CloseConnection) for e in events)

    (seen,) = srv.seen.snapshot()
    assert seen.path == "/chat?room=1"
    assert (seen.header("upgrade") or "").lower() == "websocket"  # wsproto sends "WebSocket"
    assert not srv.errors


# -- lifecycle ----------------------------------------------------------------------------


def test_stop_is_bounded_with_idle_keepalive(pki: TestPKI) -> None:
    # An idle pooled connection must not stretch stop(): the e2e suite starts and stops
    # many upstreams while clients (or the proxy) still hold connections to them.
    srv = EchoServer(pki).start()
    h2 = H2EchoServer(pki).start()
    wait_port(HOST, h2.port, timeout=1.0)
    with client(pki) as c1, client(pki, http2=True) as c2:
        assert c1.get(f"{srv.url}/").status_code == 200
        assert c2.get(f"{h2.url}/").http_version == "HTTP/2"
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        h2.stop()  # hypercorn graceful period + capped TLS close_notify wait
        assert time.monotonic() - started < 4.0
    assert not srv.errors
    assert not h2.errors
