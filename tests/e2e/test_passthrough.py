"""`intercept: matching`: only connections a credential rule could apply to are intercepted."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from cryptography import x509

from tests.support.pki import TestPKI
from tests.support.policies import credential_rule, header_binding, template
from tests.support.proxyproc import ProxyProcess, read_head
from tests.support.upstreams import EchoServer

from .test_admin_api import envelope_ok, headers_source

pytestmark = pytest.mark.e2e

TOKEN = "pt_tok_Hh33Jj44"
HOSTS = ["ruled.example.test", "free.example.test", "later.example.test", "blocked.example.test"]


class Ctx:
    def __init__(self, pki: TestPKI, proxy: ProxyProcess, echo: EchoServer) -> None:
        self.pki, self.proxy, self.echo = pki, proxy, echo

    def tunnel(self, host: str, sni: str | None = None, trust: str = "proxy") -> ssl.SSLSocket:
        """CONNECT host:443 through the proxy, then TLS inside, trusting `trust`'s CA."""
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
        sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        reply, _ = read_head(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        cafile = self.proxy.ca_path if trust == "proxy" else self.pki.root_pem_path
        tls_ctx = ssl.create_default_context(cafile=str(cafile))
        return tls_ctx.wrap_socket(sock, server_hostname=sni or host)

    @staticmethod
    def get(tls: ssl.SSLSocket, host: str, path: str = "/") -> bytes:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("passthrough")
    pki = TestPKI.create(base / "pki")
    with EchoServer(pki, names=HOSTS) as echo:
        config = {
            "proxy": {
                "upstreamCaFile": str(pki.root_pem_path),
                "connectTo": {f"{h}:443": f"127.0.0.1:{echo.port}" for h in HOSTS},
                # intercept: matching is the default: not set on purpose.
            },
            "sources": [headers_source("tok", TOKEN)],
            "templates": [
                template(
                    "default",
                    [credential_rule("ruled", "b", ["ruled.example.test"])],
                    [header_binding("b", "tok")],
                    traffic=[
                        {
                            "name": "no-blocked",
                            "action": "deny",
                            "domains": ["blocked.example.test"],
                        }
                    ],
                )
            ],
        }
        proxy = ProxyProcess(base / "proxy", config)
        with proxy:
            yield Ctx(pki, proxy, echo)


def _issuer_cn(tls: ssl.SSLSocket) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.issuer.rfc4514_string())


def test_host_without_rule_is_tunnelled_with_the_upstreams_own_certificate(ctx: Ctx) -> None:
    # The client must trust the upstream's own CA: the proxy is not in the middle.
    tls = ctx.tunnel("free.example.test", trust="upstream")
    assert "test intermediate" in _issuer_cn(tls)
    n = len(ctx.echo.seen)
    answer = ctx.get(tls, "free.example.test", "/free")
    tls.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert ctx.echo.seen.snapshot()[n].header("Authorization") is None
    line = ctx.proxy.wait_audit(
        lambda d: d.get("decision") == "tunnelled" and d.get("host") == "free.example.test"
    )
    assert line["sandbox"] == "default" and line["port"] == 443
    # Bytes each way: at least the request and the answer the client saw.
    assert line["bytesUp"] > len(b"GET /free HTTP/1.1\r\n")
    assert line["bytesDown"] > len(answer)
    assert line["durationMs"] >= 0
    # Trusting only the proxy's CA, the same connection fails: it really is not ours.
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.tunnel("free.example.test", trust="proxy")


def test_host_with_rule_is_intercepted_and_injected(ctx: Ctx) -> None:
    tls = ctx.tunnel("ruled.example.test", trust="proxy")
    assert "mitmproxy" in _issuer_cn(tls)
    n = len(ctx.echo.seen)
    answer = ctx.get(tls, "ruled.example.test")
    assert answer.startswith(b"HTTP/1.1 200")
    assert ctx.echo.seen.snapshot()[n].header("Authorization") == f"Bearer {TOKEN}"


def test_sni_naming_a_ruled_host_on_another_target_gets_no_credential(ctx: Ctx) -> None:
    # CONNECT to a host without rules, SNI naming the ruled one: never passed through on the
    # strength of the CONNECT alone, never given the credential; the handshake is refused.
    n = len(ctx.echo.seen)
    with pytest.raises(ssl.SSLError):
        tls = ctx.tunnel("free.example.test", sni="ruled.example.test", trust="upstream")
        ctx.get(tls, "ruled.example.test")
    assert all(s.header("Authorization") is None for s in ctx.echo.seen.snapshot()[n:])
    ctx.proxy.wait_audit(lambda d: d.get("reason") == "sni_mismatch")


def test_denied_host_still_gets_403(ctx: Ctx) -> None:
    sock = socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10)
    sock.sendall(b"CONNECT blocked.example.test:443 HTTP/1.1\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 403")
    sock.close()


def test_rule_added_through_the_api_applies_to_the_next_connection(ctx: Ctx) -> None:
    tls = ctx.tunnel("later.example.test", trust="upstream")  # no rule yet: tunnelled
    assert "test intermediate" in _issuer_cn(tls)
    tls.close()
    with ctx.proxy.admin() as a:
        envelope_ok(
            a.post(
                "/api/v1/sandboxes",
                json={"id": "later", "template": "default"},
            ),
            201,
        )
        sb = envelope_ok(a.get("/api/v1/sandboxes/later"), 200)
        assert sb["id"] == "later"
        envelope_ok(
            a.post(
                "/api/v1/templates",
                json={
                    "name": "with-later",
                    "spec": {
                        "network": {
                            "egress": {
                                "credentialRules": [
                                    {
                                        "name": "later",
                                        "credentialRef": "b",
                                        "domains": ["later.example.test"],
                                    }
                                ]
                            },
                            "credentialBindings": [header_binding("b", "tok")],
                        }
                    },
                },
            ),
            201,
        )
        created = envelope_ok(
            a.post("/api/v1/sandboxes", json={"id": "later-2", "template": "with-later"}), 201
        )
    # The new sandbox's next new connection to that host is intercepted and injected.
    proxy_auth = created["proxyUrl"].split("//", 1)[1].split("@", 1)[0]
    import base64

    sock = socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10)
    header = base64.b64encode(proxy_auth.encode()).decode()
    sock.sendall(
        b"CONNECT later.example.test:443 HTTP/1.1\r\nProxy-Authorization: Basic "
        + header.encode()
        + b"\r\n\r\n"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(ctx.proxy.ca_path)).wrap_socket(
        sock, server_hostname="later.example.test"
    )
    n = len(ctx.echo.seen)
    assert ctx.get(tls, "later.example.test").startswith(b"HTTP/1.1 200")
    assert ctx.echo.seen.snapshot()[n].header("Authorization") == f"Bearer {TOKEN}"


def test_revoking_a_sandbox_closes_its_tunnels(ctx: Ctx) -> None:
    import base64

    with ctx.proxy.admin() as a:
        sb = envelope_ok(
            a.post("/api/v1/sandboxes", json={"id": "tunnel-rev", "template": "default"}), 201
        )
    auth = base64.b64encode(f"tunnel-rev:{sb['token']}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10)
    sock.sendall(
        b"CONNECT free.example.test:443 HTTP/1.1\r\nProxy-Authorization: Basic "
        + auth.encode()
        + b"\r\n\r\n"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(ctx.pki.root_pem_path)).wrap_socket(
        sock, server_hostname="free.example.test"
    )
    tls.sendall(b"GET / HTTP/1.1\r\nHost: free.example.test\r\n\r\n")
    assert tls.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive, tunnelled
    with ctx.proxy.admin() as a:
        envelope_ok(a.delete("/api/v1/sandboxes/tunnel-rev"), 200)
    tls.settimeout(5)
    closed = False
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        try:
            closed = tls.recv(65536) == b""  # the rest of the first answer, then EOF
        except (ssl.SSLError, OSError):
            closed = True
    assert closed, "the revoked sandbox's tunnel stayed open"
    line = ctx.proxy.wait_audit(
        lambda d: d.get("sandbox") == "tunnel-rev" and d.get("decision") == "tunnelled"
    )
    assert line["reason"] == "revoked"
