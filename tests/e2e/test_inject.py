"""Header and basic-auth injection through the real proxy, with curl and httpx."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from .conftest import API_KEY, BASIC_PASS, BASIC_USER, BEARER, SANDBOX_TOKEN, Env

pytestmark = pytest.mark.e2e


def test_bearer_injected_with_curl(env: Env, mark: dict[str, int]) -> None:
    r = env.curl("https://api.example.test/v1/repos")
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    assert len(seen) == 1
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]
    # The client never sees the secret in what comes back either (the echo aside, which is
    # the upstream's own doing): the proxy adds nothing of it to the response headers.
    assert seen[0].path == "/v1/repos"


def test_bearer_injected_with_httpx(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        r = c.post("https://api.example.test/v1/items", content=b"hello")
    assert r.status_code == 200
    assert r.json()["headers"]["authorization"] == f"Bearer {BEARER}"


@pytest.mark.parametrize(
    ("method", "url", "headers"),
    [
        ("GET", "https://other.example.test/v1/repos", {}),  # other host
        ("DELETE", "https://api.example.test/v1/repos", {}),  # method not listed
        ("GET", "https://api.example.test/v2/repos", {}),  # path outside the prefix
        ("GET", "https://api.example.test/search?scope=user", {}),  # query value differs
        ("GET", "https://api.example.test/search", {}),  # query parameter absent
        ("GET", "https://api.example.test/hdr", {"X-Want-Auth": "no"}),  # header value differs
        ("GET", "https://disabled.example.test/", {}),  # rule rolled out: disabled
        ("GET", "https://api.example.test/v1/../admin", {}),  # dot segments leave the prefix
        ("GET", "https://api.example.test/v1/%2e%2e/admin", {}),  # encoded dots count too
        ("GET", "https://wild.example.test/", {}),  # a wildcard never matches its apex
    ],
)
def test_nothing_injected_when_no_rule_matches(
    env: Env, mark: dict[str, int], method: str, url: str, headers: dict[str, str]
) -> None:
    with env.client() as c:
        r = c.request(method, url, headers=headers)
    assert r.status_code == 200
    seen = env.seen_since(env.echo, mark["echo"])
    assert len(seen) == 1
    assert seen[0].header_values("Authorization") == []
    assert seen[0].header_values("X-Api-Key") == []


@pytest.mark.parametrize(
    ("url", "headers", "path_upstream"),
    [
        ("https://api.example.test/search?scope=repo", {}, "/search?scope=repo"),
        ("https://api.example.test/hdr", {"X-Want-Auth": "yes"}, "/hdr"),
        # The upstream gets the same normalised path the rule matched.
        ("https://api.example.test/x/%2E%2E/v1/a", {}, "/v1/a"),
        ("https://api.example.test/v1/a/./b", {}, "/v1/a/b"),
    ],
)
def test_http_match_variants_inject(
    env: Env, mark: dict[str, int], url: str, headers: dict[str, str], path_upstream: str
) -> None:
    # curl keeps the path as written (--path-as-is), unlike httpx which would resolve dots.
    args = ["--path-as-is"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    r = env.curl(*args, url)
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    assert len(seen) == 1
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]
    assert seen[0].path == path_upstream


def test_wildcard_matches_any_depth(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        assert c.get("https://a.wild.example.test/").status_code == 200
        assert c.get("https://x.y.wild.example.test/").status_code == 200
    seen = env.seen_since(env.echo, mark["echo"])
    assert [s.header("X-Api-Key") for s in seen] == [API_KEY, API_KEY]


def test_basic_auth_from_username_password_source(env: Env, mark: dict[str, int]) -> None:
    r = env.curl("https://basic.example.test/")
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    expected = base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode()).decode()
    assert seen[0].header_values("Authorization") == [f"Basic {expected}"]


def test_client_authorization_is_replaced(env: Env, mark: dict[str, int]) -> None:
    r = env.curl("-H", "Authorization: Bearer client-made-up", "https://api.example.test/v1/x")
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]


def test_proxy_authorization_never_forwarded(env: Env, mark: dict[str, int]) -> None:
    # curl sends Proxy-Authorization on the CONNECT; a client may also put one inside.
    r = env.curl(
        "--proxy-user",
        f"ci-runner:{SANDBOX_TOKEN}",
        "-H",
        "Proxy-Authorization: Basic aW5uZXI6c2VjcmV0",
        "https://api.example.test/v1/x",
    )
    assert r.returncode == 0, r.stderr
    r2 = env.curl(
        "--proxy-user", f"ci-runner:{SANDBOX_TOKEN}", "http://other.example.test/plain"
    )  # plain http: sent with the request
    assert r2.returncode == 0, r2.stderr
    tls_seen = env.seen_since(env.echo, mark["echo"])
    plain_seen = env.seen_since(env.plain, mark["plain"])
    assert tls_seen and plain_seen
    for s in [*tls_seen, *plain_seen]:
        assert s.header_values("Proxy-Authorization") == []


def test_plain_http_gets_nothing_unless_rule_says_http(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        assert c.get("http://api.example.test/v1/repos").status_code == 200
        assert c.get("http://api.example.test/plain-ok/x").status_code == 200
    seen = env.seen_since(env.plain, mark["plain"])
    assert [s.header_values("Authorization") for s in seen] == [[], [f"Bearer {BEARER}"]]


def test_trace_never_injected(env: Env, mark: dict[str, int]) -> None:
    r = env.curl("-X", "TRACE", "https://api.example.test/v1/repos")
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].method == "TRACE"
    assert seen[0].header_values("Authorization") == []


def test_inner_host_header_never_selects_a_credential(env: Env, mark: dict[str, int]) -> None:
    r = env.curl("-H", "Host: api.example.test", "https://other.example.test/v1/repos")
    assert r.returncode == 0, r.stderr
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].header_values("Authorization") == []


def test_http2_injection(env: Env, mark: dict[str, int]) -> None:
    with env.client(http2=True) as c:
        r = c.get("https://h2.example.test/v1/x")
    assert r.http_version == "HTTP/2"
    seen = env.seen_since(env.h2, mark["h2"])
    assert seen[0].http_version == "2"
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]


def test_streamed_large_request_body(env: Env, mark: dict[str, int]) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    total = 12

    def body() -> Iterator[bytes]:
        for _ in range(total):
            yield chunk

    with env.client() as c:
        r = c.post("https://api.example.test/v1/upload", content=body())
    assert r.status_code == 200
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].body_len == total * len(chunk)
    assert seen[0].body_sha256 == hashlib.sha256(chunk * total).hexdigest()
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]


def _tunnel(env: Env, host: str, port: int = 443, sni: str | None = None) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(4096)
        assert data, "proxy closed the CONNECT"
        reply += data
    assert reply.startswith(b"HTTP/1.1 200"), reply
    ctx = ssl.create_default_context(cafile=str(env.proxy.ca_path))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(sock, server_hostname=sni or host)


def test_websocket_handshake_injected(env: Env, mark: dict[str, int]) -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    tls = _tunnel(env, "ws.example.test")
    ws = WSConnection(ConnectionType.CLIENT)
    tls.sendall(ws.send(Request(host="ws.example.test", target="/socket")))
    got: list[object] = []
    for _ in range(20):
        ws.receive_data(tls.recv(65536))
        got.extend(ws.events())
        if any(isinstance(e, AcceptConnection) for e in got):
            break
    assert any(isinstance(e, AcceptConnection) for e in got)
    tls.sendall(ws.send(TextMessage(data="ping-through-proxy")))
    texts: list[str] = []
    for _ in range(20):
        ws.receive_data(tls.recv(65536))
        texts += [e.data for e in ws.events() if isinstance(e, TextMessage)]
        if texts:
            break
    tls.close()
    assert texts == ["ping-through-proxy"]
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].header_values("Authorization") == [f"Bearer {BEARER}"]


def test_sni_must_name_the_connect_target(env: Env, mark: dict[str, int]) -> None:
    # CONNECT to a host without a rule, but SNI names one with a rule: refused, and the
    # credential is never sent anywhere.
    with pytest.raises(ssl.SSLError):
        tls = _tunnel(env, "other.example.test", sni="api.example.test")
        tls.sendall(b"GET /v1/x HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        tls.recv(100)
    assert env.seen_since(env.echo, mark["echo"]) == []


def test_fail_closed_answers_503_with_names(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        r = c.get("https://closed.example.test/anything")
    assert r.status_code == 503
    assert r.headers["X-Egress-Auth-Error"] == "credential_unavailable"
    body = r.json()
    assert body["error"] == "credential_unavailable"
    assert (body["rule"], body["binding"], body["source"], body["reason"]) == (
        "closed",
        "missing-src",
        "not-created-yet",
        "missing",
    )
    assert env.seen_since(env.echo, mark["echo"]) == []


def test_expired_source_answers_503_expired(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        r = c.get("https://expired.example.test/")
    assert r.status_code == 503
    assert r.json()["reason"] == "expired"
    assert env.seen_since(env.echo, mark["echo"]) == []


def test_fail_open_passes_without_auth(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        r = c.get("https://open.example.test/")
    assert r.status_code == 200
    seen = env.seen_since(env.echo, mark["echo"])
    assert seen[0].header_values("Authorization") == []


def test_denied_host_gets_403_on_connect(env: Env, mark: dict[str, int]) -> None:
    r = env.curl(
        "-i",
        "--proxy-header",
        "X-Probe: 1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "https://blocked.example.test/",
    )
    assert r.stdout.strip().endswith("403"), (r.stdout, r.stderr)
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.sendall(b"CONNECT blocked.example.test:443 HTTP/1.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"x-egress-auth-error: egress_denied" in head.lower()
    parsed = json.loads(body)
    assert parsed["error"] == "egress_denied"
    assert (parsed["host"], parsed["port"], parsed["rule"]) == (
        "blocked.example.test",
        443,
        "no-blocked",
    )
    assert env.seen_since(env.echo, mark["echo"]) == []


def test_audit_lines_name_rule_binding_source(env: Env, mark: dict[str, int]) -> None:
    with env.client() as c:
        c.get("https://api.example.test/v1/audit-probe")
    line = env.proxy.wait_audit(lambda d: d.get("path") == "/v1/audit-probe")
    assert line["decision"] == "injected"
    assert line["sandbox"] == "default"
    assert (line["credentialRule"], line["binding"], line["source"]) == (
        "api-v1",
        "bearer",
        "bearer-src@1",
    )
    assert line["status"] == 200
    assert {"time", "method", "host", "port", "durationMs"} <= set(line)
