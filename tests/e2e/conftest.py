"""One real proxy process for the session, real TLS upstreams on loopback, real clients.

Upstreams get real-looking names through `connectTo`; the proxy trusts the throwaway test
root through `upstreamCaFile`; the clients trust only the proxy's CA.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.pki import Issued, TestPKI
from tests.support.policies import credential_rule, header_binding
from tests.support.proxyproc import ProxyProcess
from tests.support.upstreams import EchoServer, H2EchoServer

# Distinctive secrets: the leak tests search every output for these bytes.
BEARER = "ghp_S3cretBearerToken_0a1b2c3d4e5f"
API_KEY = "wildkey_Xq9Zr7Vt5Ws3"
BASIC_USER = "svc-deployer"
BASIC_PASS = "pw_Hunter2_Qm8Nb6Vc4"
EXPIRED_TOKEN = "expired_Tk_7Hh5Jj3Kk1"
SANDBOX_TOKEN = "sbx_Tok_4Rr2Ee0Ww8"
SECRETS = [BEARER, API_KEY, BASIC_PASS, EXPIRED_TOKEN, SANDBOX_TOKEN]

NAMES = [
    "api.example.test",
    "other.example.test",
    "basic.example.test",
    "a.wild.example.test",
    "x.y.wild.example.test",
    "wild.example.test",
    "closed.example.test",
    "open.example.test",
    "expired.example.test",
    "ws.example.test",
    "blocked.example.test",
    "disabled.example.test",
    "allowed.example.test",
]
MTLS_NAMES = [
    "mtls.example.test",
    "nocert.example.test",
    "wrongcert.example.test",
    "mtlsclosed.example.test",
]


@dataclass
class Env:
    pki: TestPKI
    proxy: ProxyProcess
    echo: EchoServer
    plain: EchoServer
    h2: H2EchoServer
    mtls: dict[str, EchoServer]  # by TLS version "1.2" / "1.3"
    client_cert: Issued
    key_pems: list[str]

    def client(self, **kw: Any) -> httpx.Client:
        trust = ssl.create_default_context(cafile=str(self.proxy.ca_path))
        return httpx.Client(proxy=self.proxy.url, verify=trust, timeout=10, **kw)

    def curl(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                str(timeout),
                "--proxy",
                self.proxy.url,
                "--cacert",
                str(self.proxy.ca_path),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )

    def seen_since(self, server: EchoServer | H2EchoServer, n: int) -> list[Any]:
        return server.seen.snapshot()[n:]


def build_config(
    pki: TestPKI,
    echo: EchoServer,
    plain: EchoServer,
    h2: H2EchoServer,
    mtls: dict[str, EchoServer],
    client: Issued,
    wrong: Issued,
) -> dict[str, Any]:
    connect_to = {f"{n}:443": f"127.0.0.1:{echo.port}" for n in NAMES}
    connect_to.update({f"{n}:80": f"127.0.0.1:{plain.port}" for n in NAMES})
    connect_to["h2.example.test:443"] = f"127.0.0.1:{h2.port}"
    for version, port in (("13", mtls["1.3"].port), ("12", mtls["1.2"].port)):
        for n in MTLS_NAMES:
            host = n.replace(".example.test", f"{version}.example.test")
            connect_to[f"{host}:443"] = f"127.0.0.1:{port}"
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

    def tls_source(name: str, issued: Issued) -> dict[str, Any]:
        return {
            "name": name,
            "resolverKind": "static_tls_client_certificate",
            "spec": {
                "staticTLSClientCertificate": {
                    "certificatePem": issued.chain_pem.decode(),
                    "privateKeyPem": issued.key_pem.decode(),
                }
            },
        }

    rules = [
        credential_rule(
            "api-v1",
            "bearer",
            ["api.example.test"],
            httpMatch={"methods": ["GET", "POST", "PUT", "TRACE"], "pathPrefixes": ["/v1/"]},
        ),
        credential_rule(
            "api-search",
            "bearer",
            ["api.example.test"],
            httpMatch={"paths": ["/search"], "query": [{"name": "scope", "values": ["repo"]}]},
        ),
        credential_rule(
            "api-hdr",
            "bearer",
            ["api.example.test"],
            httpMatch={"paths": ["/hdr"], "headers": [{"name": "X-Want-Auth", "values": ["yes"]}]},
        ),
        credential_rule(
            "api-plain",
            "bearer",
            ["api.example.test"],
            protocol="http",
            httpMatch={"pathPrefixes": ["/plain-ok/"]},
        ),
        credential_rule("basic", "basic", ["basic.example.test"]),
        credential_rule("wild", "wild-key", ["*.wild.example.test"]),
        credential_rule("ws", "bearer", ["ws.example.test"]),
        credential_rule("h2", "bearer", ["h2.example.test"]),
        credential_rule("closed", "missing-src", ["closed.example.test"]),
        credential_rule("open", "missing-src", ["open.example.test"], failurePolicy="fail-open"),
        credential_rule("expired", "expired", ["expired.example.test"]),
        credential_rule("disabled", "bearer", ["disabled.example.test"], rollout="disabled"),
        credential_rule("mtls", "cert", ["mtls13.example.test", "mtls12.example.test"]),
        credential_rule(
            "wrongcert", "wrong-cert", ["wrongcert13.example.test", "wrongcert12.example.test"]
        ),
        credential_rule(
            "mtlsclosed", "missing-cert", ["mtlsclosed13.example.test", "mtlsclosed12.example.test"]
        ),
    ]
    bindings = [
        header_binding("bearer", "bearer-src", "Authorization", "Bearer {{ .token }}"),
        header_binding("wild-key", "wild-src", "X-Api-Key", "{{token}}"),
        header_binding("missing-src", "not-created-yet", "Authorization", "Bearer {{ .token }}"),
        header_binding("expired", "expired-src", "Authorization", "Bearer {{ .token }}"),
        {"ref": "basic", "sourceRef": "basic-src", "projection": {"type": "username_password"}},
        {"ref": "cert", "sourceRef": "cert-src", "projection": {"type": "tls_client_certificate"}},
        {
            "ref": "wrong-cert",
            "sourceRef": "wrong-cert-src",
            "projection": {"type": "tls_client_certificate"},
        },
        {
            "ref": "missing-cert",
            "sourceRef": "cert-not-created",
            "projection": {"type": "tls_client_certificate"},
        },
    ]
    return {
        "proxy": {
            "upstreamCaFile": str(pki.root_pem_path),
            "connectTo": connect_to,
            "intercept": "all",
        },
        "sources": [
            {
                "name": "bearer-src",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": "${env:TEST_BEARER}"}}},
            },
            {
                "name": "wild-src",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": "${file:wild-token.txt}"}}},
            },
            {
                "name": "expired-src",
                "resolverKind": "static_headers",
                "expiresAt": past,
                "spec": {"staticHeaders": {"values": {"token": EXPIRED_TOKEN}}},
            },
            {
                "name": "basic-src",
                "resolverKind": "static_username_password",
                "spec": {
                    "staticUsernamePassword": {"username": BASIC_USER, "password": BASIC_PASS}
                },
            },
            tls_source("cert-src", client),
            tls_source("wrong-cert-src", wrong),
        ],
        "sandboxes": [
            {"id": "ci-runner", "template": "default", "token": "${env:TEST_SANDBOX_TOKEN}"},
        ],
        "templates": [
            {
                "name": "default",
                "spec": {
                    "network": {
                        "mode": "allow-all",
                        "egress": {
                            "trafficRules": [
                                {
                                    "name": "no-blocked",
                                    "action": "deny",
                                    "domains": ["blocked.example.test"],
                                },
                            ],
                            "credentialRules": rules,
                        },
                        "credentialBindings": bindings,
                    }
                },
            }
        ],
    }


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("e2e")
    pki = TestPKI.create(base / "pki")
    client_cert = pki.client("sandbox-client")
    wrong = pki.client("intruder", issuer="other")
    with (
        EchoServer(pki, names=[*NAMES, "h2.example.test"]) as echo,
        EchoServer(pki, tls=False) as plain,
        H2EchoServer(pki, names=["h2.example.test"]) as h2,
        EchoServer(
            pki,
            names=[n.replace(".example.test", "13.example.test") for n in MTLS_NAMES],
            client_cert="required",
            tls_max="1.3",
        ) as m13,
        EchoServer(
            pki,
            names=[n.replace(".example.test", "12.example.test") for n in MTLS_NAMES],
            client_cert="required",
            tls_max="1.2",
        ) as m12,
    ):
        mtls = {"1.3": m13, "1.2": m12}
        config = build_config(pki, echo, plain, h2, mtls, client_cert, wrong)
        workdir = base / "proxy"
        workdir.mkdir()
        (workdir / "wild-token.txt").write_text(API_KEY + "\n")
        proxy = ProxyProcess(
            workdir, config, env={"TEST_BEARER": BEARER, "TEST_SANDBOX_TOKEN": SANDBOX_TOKEN}
        )
        with proxy:
            yield Env(
                pki,
                proxy,
                echo,
                plain,
                h2,
                mtls,
                client_cert,
                [client_cert.key_pem.decode(), wrong.key_pem.decode()],
            )


@pytest.fixture
def mark(env: Env) -> dict[str, int]:
    """How many requests each upstream had seen when the test started."""
    return {
        "echo": len(env.echo.seen),
        "plain": len(env.plain.seen),
        "h2": len(env.h2.seen),
        "m13": len(env.mtls["1.3"].seen),
        "m12": len(env.mtls["1.2"].seen),
    }


def last_error_body(path: Path) -> str:
    return path.read_text()
