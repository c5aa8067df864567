"""Admin API contract: every endpoint and status code, through the real process."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.pki import Issued, TestPKI
from tests.support.policies import header_binding
from tests.support.proxyproc import ProxyProcess
from tests.support.upstreams import EchoServer

pytestmark = pytest.mark.e2e

TOKEN_A = "api_tok_A_Zx81Qw"
TOKEN_B = "api_tok_B_Lp02Er"
DECLARED = "declared_tok_Mn55Bv"
PASSWORD = "api_pw_Kj77Hg"


def headers_source(name: str, token: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "resolverKind": "static_headers",
        "spec": {"staticHeaders": {"values": {"token": token}}},
        **extra,
    }


def tls_source(name: str, issued: Issued, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "resolverKind": "static_tls_client_certificate",
        "spec": {
            "staticTLSClientCertificate": {
                "certificatePem": issued.chain_pem.decode(),
                "privateKeyPem": issued.key_pem.decode(),
            }
        },
        **extra,
    }


def admin_config(pki: TestPKI, echo: EchoServer, mtls: EchoServer) -> dict[str, Any]:
    hosts = ["api.example.test", "declared.example.test", "basic.example.test"]
    connect_to = {f"{h}:443": f"127.0.0.1:{echo.port}" for h in hosts}
    connect_to["mtls.example.test:443"] = f"127.0.0.1:{mtls.port}"

    return {
        "proxy": {
            "upstreamCaFile": str(pki.root_pem_path),
            "connectTo": connect_to,
            "intercept": "all",
        },
        "sources": [headers_source("declared-src", DECLARED)],
        "templates": [
            {
                "name": "default",
                "spec": {
                    "network": {
                        "egress": {
                            "credentialRules": [
                                {
                                    "name": "api",
                                    "credentialRef": "api",
                                    "domains": ["api.example.test"],
                                },
                                {
                                    "name": "declared",
                                    "credentialRef": "declared",
                                    "domains": ["declared.example.test"],
                                },
                                {
                                    "name": "basic",
                                    "credentialRef": "basic",
                                    "domains": ["basic.example.test"],
                                },
                                {
                                    "name": "mtls",
                                    "credentialRef": "mtls",
                                    "domains": ["mtls.example.test"],
                                },
                            ]
                        },
                        "credentialBindings": [
                            header_binding("api", "api-token"),
                            header_binding("declared", "declared-src"),
                            {
                                "ref": "basic",
                                "sourceRef": "api-basic",
                                "projection": {"type": "username_password"},
                            },
                            {
                                "ref": "mtls",
                                "sourceRef": "api-cert",
                                "projection": {"type": "tls_client_certificate"},
                            },
                        ],
                    }
                },
            }
        ],
    }


class Ctx:
    def __init__(
        self, pki: TestPKI, proxy: ProxyProcess, echo: EchoServer, mtls: EchoServer
    ) -> None:
        self.pki, self.proxy, self.echo, self.mtls = pki, proxy, echo, mtls

    def client(self) -> httpx.Client:
        trust = ssl.create_default_context(cafile=str(self.proxy.ca_path))
        return httpx.Client(proxy=self.proxy.url, verify=trust, timeout=10)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("admin")
    pki = TestPKI.create(base / "pki")
    with (
        EchoServer(
            pki, names=["api.example.test", "declared.example.test", "basic.example.test"]
        ) as echo,
        EchoServer(pki, names=["mtls.example.test"], client_cert="required", tls_max="1.3") as mtls,
    ):
        proxy = ProxyProcess(base / "proxy", admin_config(pki, echo, mtls))
        with proxy:
            yield Ctx(pki, proxy, echo, mtls)


def envelope_ok(r: httpx.Response, status: int) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is True
    return body["data"]


def envelope_err(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def test_unauthenticated_calls_answer_401(ctx: Ctx) -> None:
    with httpx.Client(base_url=ctx.proxy.admin_url, timeout=10) as c:
        for method, path in [
            ("GET", "/api/v1/credential-sources"),
            ("POST", "/api/v1/credential-sources"),
            ("GET", "/api/v1/credential-sources/x"),
            ("PUT", "/api/v1/credential-sources/x"),
            ("DELETE", "/api/v1/credential-sources/x"),
            ("GET", "/metrics"),
        ]:
            envelope_err(c.request(method, path), 401, "unauthorized")
        envelope_err(
            c.get("/api/v1/credential-sources", headers={"Authorization": "Bearer wrong"}),
            401,
            "unauthorized",
        )
        # These need no token.
        assert envelope_ok(c.get("/healthz"), 200) == {"status": "ok"}
        pem = c.get("/api/v1/ca.pem")
        assert pem.status_code == 200
        assert pem.content == ctx.proxy.ca_path.read_bytes()
        schema = c.get("/openapi.json")
        assert schema.status_code == 200
        assert "/api/v1/credential-sources" in schema.json()["paths"]


def test_seed_create_example_then_read_metadata(ctx: Ctx) -> None:
    # The seed's example: create github-source with a token, read back only metadata.
    with ctx.proxy.admin() as a:
        data = envelope_ok(
            a.post(
                "/api/v1/credential-sources",
                json={
                    "name": "github-source",
                    "resolverKind": "static_headers",
                    "spec": {"staticHeaders": {"values": {"token": "ghp_seedExample123"}}},
                },
            ),
            201,
        )
        assert data["name"] == "github-source"
        assert data["resolverKind"] == "static_headers"
        assert data["currentVersion"] == 1
        assert data["status"] == "ready"
        assert data["createdAt"] == data["updatedAt"]
        assert "spec" not in data and "ghp_seedExample123" not in str(data)
        got = envelope_ok(a.get("/api/v1/credential-sources/github-source"), 200)
        assert got == data
        listed = envelope_ok(a.get("/api/v1/credential-sources"), 200)
        assert data in listed
        envelope_err(
            a.post(
                "/api/v1/credential-sources",
                json={
                    "name": "github-source",
                    "resolverKind": "static_headers",
                    "spec": {"staticHeaders": {"values": {"token": "again"}}},
                },
            ),
            409,
            "conflict",
        )
        envelope_ok(a.delete("/api/v1/credential-sources/github-source"), 200)
        envelope_err(a.get("/api/v1/credential-sources/github-source"), 404, "not_found")
        envelope_err(a.delete("/api/v1/credential-sources/github-source"), 404, "not_found")


def test_create_use_rotate_delete_through_the_proxy(ctx: Ctx) -> None:
    with ctx.proxy.admin() as a, ctx.client() as c:
        # Before the source exists, its fail-closed rule answers 503 missing.
        r = c.get("https://api.example.test/")
        assert r.status_code == 503 and r.json()["reason"] == "missing"
        envelope_ok(
            a.post("/api/v1/credential-sources", json=headers_source("api-token", TOKEN_A)), 201
        )
        n = len(ctx.echo.seen)
        assert c.get("https://api.example.test/").status_code == 200
        data = envelope_ok(
            a.put(
                "/api/v1/credential-sources/api-token",
                json={
                    "resolverKind": "static_headers",
                    "spec": {"staticHeaders": {"values": {"token": TOKEN_B}}},
                },
            ),
            200,
        )
        assert data["currentVersion"] == 2
        assert data["updatedAt"] > data["createdAt"]
        assert c.get("https://api.example.test/").status_code == 200
        seen = [s.header("Authorization") for s in ctx.echo.seen.snapshot()[n:]]
        assert seen == [f"Bearer {TOKEN_A}", f"Bearer {TOKEN_B}"]
        line = ctx.proxy.wait_audit(lambda d: d.get("source") == "api-token@2")
        assert line["decision"] == "injected"
        # A binding still refers to it: delete refused.
        err = envelope_err(a.delete("/api/v1/credential-sources/api-token"), 409, "in_use")
        assert err["details"] == [{"template": "default", "binding": "api"}]


def test_put_rules(ctx: Ctx) -> None:
    with ctx.proxy.admin() as a:
        envelope_ok(a.post("/api/v1/credential-sources", json=headers_source("put-me", "v1")), 201)
        err = envelope_err(
            a.put(
                "/api/v1/credential-sources/put-me",
                json={
                    "resolverKind": "static_username_password",
                    "spec": {"staticUsernamePassword": {"username": "u", "password": PASSWORD}},
                },
            ),
            400,
            "invalid",
        )
        assert "resolverKind" in err["message"]
        envelope_err(
            a.put("/api/v1/credential-sources/nope", json=headers_source("nope", "x")),
            404,
            "not_found",
        )
        envelope_err(
            a.put("/api/v1/credential-sources/put-me", json=headers_source("other-name", "x")),
            400,
            "invalid",
        )
        data = envelope_ok(
            a.put("/api/v1/credential-sources/put-me", json=headers_source("put-me", "v2")), 200
        )
        assert data["currentVersion"] == 2
        envelope_ok(a.delete("/api/v1/credential-sources/put-me"), 200)


def test_config_declared_sources_are_read_only(ctx: Ctx) -> None:
    with ctx.proxy.admin() as a:
        data = envelope_ok(a.get("/api/v1/credential-sources/declared-src"), 200)
        assert data["currentVersion"] == 1 and data["origin"] == "config"
        envelope_err(
            a.post("/api/v1/credential-sources", json=headers_source("declared-src", "x")),
            409,
            "read_only",
        )
        envelope_err(
            a.put(
                "/api/v1/credential-sources/declared-src", json=headers_source("declared-src", "x")
            ),
            409,
            "read_only",
        )
        envelope_err(a.delete("/api/v1/credential-sources/declared-src"), 409, "read_only")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "name": "Bad_Name",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": "x"}}},
            },
            "name",
        ),
        ({"name": "k", "resolverKind": "static_magic", "spec": {}}, "resolverKind"),
        (
            {
                "name": "k",
                "resolverKind": "static_headers",
                "spec": {"staticUsernamePassword": {"username": "u", "password": PASSWORD}},
            },
            "spec",
        ),
        (
            {
                "name": "k",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": "a\r\nX-Evil: " + PASSWORD}}},
            },
            "spec.staticHeaders.values",
        ),
        (
            {
                "name": "k",
                "resolverKind": "static_headers",
                "bogus": 1,
                "spec": {"staticHeaders": {"values": {"token": "x"}}},
            },
            "bogus",
        ),
        (
            {
                "name": "k",
                "resolverKind": "static_headers",
                "expiresAt": "tomorrow",
                "spec": {"staticHeaders": {"values": {"token": "x"}}},
            },
            "expiresAt",
        ),
    ],
)
def test_invalid_bodies_answer_400_naming_the_field(
    ctx: Ctx, body: dict[str, Any], field: str
) -> None:
    with ctx.proxy.admin() as a:
        r = a.post("/api/v1/credential-sources", json=body)
    err = envelope_err(r, 400, "invalid")
    assert any(d["field"].startswith(field) for d in err["details"]), err
    assert PASSWORD not in r.text


def test_bad_pems_answer_400_without_echoing_the_key(ctx: Ctx) -> None:
    good = ctx.pki.client("pem-check")
    other = ctx.pki.client("other-key")
    cases = [
        ({"certificatePem": "not a pem", "privateKeyPem": good.key_pem.decode()}, "certificatePem"),
        (
            {"certificatePem": good.chain_pem.decode(), "privateKeyPem": "garbage " + PASSWORD},
            "privateKeyPem",
        ),
        (
            {"certificatePem": good.chain_pem.decode(), "privateKeyPem": other.key_pem.decode()},
            "privateKeyPem",
        ),
        (
            {
                "certificatePem": good.chain_pem.decode(),
                "privateKeyPem": good.key_pem.decode(),
                "caPem": "nope",
            },
            "caPem",
        ),
    ]
    with ctx.proxy.admin() as a:
        for spec, field in cases:
            r = a.post(
                "/api/v1/credential-sources",
                json={
                    "name": "pem-src",
                    "resolverKind": "static_tls_client_certificate",
                    "spec": {"staticTLSClientCertificate": spec},
                },
            )
            err = envelope_err(r, 400, "invalid")
            assert field in err["message"] or any(field in d["field"] for d in err["details"])
            assert PASSWORD not in r.text
            for line in other.key_pem.decode().splitlines()[1:-1]:
                assert line not in r.text


def test_source_must_fit_the_bindings_that_use_it(ctx: Ctx) -> None:
    # Binding `api` renders {{ .token }}: a source without `token` is refused, naming it.
    with ctx.proxy.admin() as a:
        r = a.post(
            "/api/v1/credential-sources",
            json={
                "name": "api-token-2",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"tok": "x"}}},
            },
        )
        envelope_ok(r, 201)  # no binding uses api-token-2: fine
        r = a.post(
            "/api/v1/credential-sources",
            json={
                "name": "api-basic",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"tok": "x"}}},
            },
        )
        err = envelope_err(r, 400, "invalid")
        assert "binding 'basic'" in err["message"]
        envelope_ok(a.delete("/api/v1/credential-sources/api-token-2"), 200)


def test_body_over_one_mib_is_413(ctx: Ctx) -> None:
    big = {
        "name": "big",
        "resolverKind": "static_headers",
        "spec": {"staticHeaders": {"values": {"token": "x" * (1024 * 1024 + 10)}}},
    }
    with ctx.proxy.admin() as a:
        envelope_err(a.post("/api/v1/credential-sources", json=big), 413, "too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: streamed
            yield b'{"name": "big", "resolverKind": "static_headers", "spec": '
            for _ in range(1100):
                yield b" " * 1024
            yield b"}"

        envelope_err(
            a.post(
                "/api/v1/credential-sources",
                content=chunks(),
                headers={"Content-Type": "application/json"},
            ),
            413,
            "too_large",
        )


def test_basic_and_mtls_sources_through_the_api(ctx: Ctx) -> None:
    cert = ctx.pki.client("api-created-client")
    with ctx.proxy.admin() as a, ctx.client() as c:
        data = envelope_ok(
            a.post("/api/v1/credential-sources", json=tls_source("api-cert", cert)), 201
        )
        assert data["certificate"]["subject"].startswith("CN=api-created-client")
        assert data["certificate"]["issuer"]
        assert len(data["certificate"]["sha256Fingerprint"].split(":")) == 32
        n = len(ctx.mtls.seen)
        assert c.get("https://mtls.example.test/").status_code == 200
        assert ctx.mtls.seen.snapshot()[n].client_cert_subject_cn == "api-created-client"
        # Rotate the certificate on a kept-alive connection: the response in flight is the
        # last on it (Connection: close), and the next request presents the new one.
        cert2 = ctx.pki.client("rotated-client")
        envelope_ok(
            a.put("/api/v1/credential-sources/api-cert", json=tls_source("api-cert", cert2)),
            200,
        )
        r = c.get("https://mtls.example.test/")
        assert r.status_code == 200
        assert r.headers.get("connection") == "close"
        assert c.get("https://mtls.example.test/").status_code == 200
    names = [s.client_cert_subject_cn for s in ctx.mtls.seen.snapshot()[n:]]
    assert names == ["api-created-client", "api-created-client", "rotated-client"]
    with ctx.proxy.admin() as a:
        envelope_ok(
            a.post(
                "/api/v1/credential-sources",
                json={
                    "name": "api-basic",
                    "resolverKind": "static_username_password",
                    "spec": {"staticUsernamePassword": {"username": "bot", "password": PASSWORD}},
                },
            ),
            201,
        )


def test_metrics_count_without_values(ctx: Ctx) -> None:
    with ctx.proxy.admin() as a:
        text = a.get("/metrics").text
    assert "egress_auth_admin_writes_total" in text
    assert 'egress_auth_requests_total{decision="injected"}' in text
    assert "egress_auth_policy_snapshot_generation" in text
    for secret in (TOKEN_A, TOKEN_B, DECLARED, PASSWORD):
        assert secret not in text


def test_expires_at_stops_resolution_and_purges(ctx: Ctx, tmp_path: Path) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    with ctx.proxy.admin() as a:
        envelope_ok(
            a.post(
                "/api/v1/credential-sources",
                json=headers_source("api-token-exp", "exp_tok_Ab12", expiresAt=soon),
            ),
            201,
        )
        time.sleep(2.0)
        data = envelope_ok(a.get("/api/v1/credential-sources/api-token-exp"), 200)
        assert data["status"] == "expired"
        assert data["expiresAt"] is not None
        envelope_ok(a.delete("/api/v1/credential-sources/api-token-exp"), 200)
    assert b"exp_tok_Ab12" not in (ctx.proxy.data_dir / "egress-auth.db").read_bytes()
