"""`explain` answers with the very decision the proxy then takes.

For each case of the table: ask POST /api/v1/sandboxes/{id}/explain, then send the same request
through the proxy as that sandbox and check that what happened matches explain's answer, on the
wire (status, error body, what the upstream saw) and in the audit line.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.support.pki import Issued, TestPKI
from tests.support.policies import credential_rule, header_binding
from tests.support.proxyproc import ProxyProcess, read_head
from tests.support.upstreams import EchoServer, Seen

from .test_admin_api import envelope_ok

pytestmark = pytest.mark.e2e

BEARER = "xpl_Bearer_Tk_9Qw2Er4Ty6"
WILD = "xpl_Wild_Key_3As5Df7Gh"
EXPIRED = "xpl_Expired_1Zx3Cv5Bn"
ROT_V1 = "xpl_Rot_v1_7Uj8Ik9Ol"
ROT_V2 = "xpl_Rot_v2_2Mn4Bv6Cx"
OWN = "xpl_Own_Key_5Tg7Yh9Uj"
CERT_CN = "explain-client"
# Every header a binding of this file may set: a request that was not injected has none.
CREDENTIAL_HEADERS = ["Authorization", "X-Api-Key", "X-Own-Key"]

TLS_HOSTS = [
    "api.example.test",
    "allowed.example.test",
    "blocked.example.test",
    "a.wild.example.test",
    "x.y.wild.example.test",
    "wild.example.test",
    "closed.example.test",
    "open.example.test",
    "expired.example.test",
    "disabled.example.test",
    "rotated.example.test",
    "cidr.example.test",
    "xn--bcher-kva.example.test",  # bücher.example.test
]
PLAIN_HOSTS = ["api.example.test", "plain.example.test"]
MTLS_HOSTS = ["mtls.example.test", "mtlsclosed.example.test"]


def _headers_source(name: str, token: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "resolverKind": "static_headers",
        "spec": {"staticHeaders": {"values": {"token": token}}},
        **extra,
    }


def build_config(
    pki: TestPKI, echo: EchoServer, plain: EchoServer, mtls: EchoServer, cert: Issued
) -> dict[str, Any]:
    connect_to = {f"{h}:443": f"127.0.0.1:{echo.port}" for h in TLS_HOSTS}
    connect_to["cidr.example.test:8443"] = f"127.0.0.1:{echo.port}"
    connect_to["cidr.example.test:8444"] = f"127.0.0.1:{echo.port}"
    connect_to["api.example.test:8443"] = f"127.0.0.1:{echo.port}"
    connect_to.update({f"{h}:80": f"127.0.0.1:{plain.port}" for h in PLAIN_HOSTS})
    connect_to.update({f"{h}:443": f"127.0.0.1:{mtls.port}" for h in MTLS_HOSTS})
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    rules = [
        credential_rule(
            "api-v1",
            "bearer",
            ["api.example.test"],
            httpMatch={"methods": ["GET", "POST", "TRACE"], "pathPrefixes": ["/v1/"]},
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
            "api-nodebug",
            "bearer",
            ["api.example.test"],
            httpMatch={"paths": ["/nodebug"], "query": [{"name": "debug", "present": False}]},
        ),
        credential_rule(
            "plain-http",
            "bearer",
            ["plain.example.test"],
            protocol="http",
            httpMatch={"pathPrefixes": ["/p/"]},
        ),
        credential_rule("wild", "wild-key", ["*.wild.example.test"]),
        credential_rule("closed", "missing", ["closed.example.test"]),
        credential_rule("open", "missing", ["open.example.test"], failurePolicy="fail-open"),
        credential_rule("expired", "expired", ["expired.example.test"]),
        credential_rule("dis-first", "bearer", ["disabled.example.test"], rollout="disabled"),
        credential_rule("dis-fallback", "wild-key", ["disabled.example.test"]),
        credential_rule("rotated", "rot", ["rotated.example.test"]),
        credential_rule("allowed", "bearer", ["allowed.example.test"]),
        credential_rule("cidr-host", "bearer", ["cidr.example.test"], ports=[{"port": 8443}]),
        credential_rule("idn", "bearer", ["bücher.example.test"]),
        credential_rule("mtls", "cert", ["mtls.example.test"]),
        credential_rule("mtls-closed", "missing-cert", ["mtlsclosed.example.test"]),
    ]
    bindings = [
        header_binding("bearer", "bearer-src", "Authorization", "Bearer {{ .token }}"),
        header_binding("wild-key", "wild-src", "X-Api-Key", "{{token}}"),
        header_binding("missing", "not-created", "Authorization", "Bearer {{ .token }}"),
        header_binding("expired", "expired-src", "Authorization", "Bearer {{ .token }}"),
        header_binding("rot", "rot-src", "Authorization", "Bearer {{ .token }}"),
        {"ref": "cert", "sourceRef": "cert-src", "projection": {"type": "tls_client_certificate"}},
        {
            "ref": "missing-cert",
            "sourceRef": "cert-not-created",
            "projection": {"type": "tls_client_certificate"},
        },
    ]
    traffic = [
        {"name": "no-blocked", "action": "deny", "domains": ["blocked.example.test"]},
        # Matches the address the proxy dials (connectTo's 127.0.0.1), not the name.
        {"name": "no-8444", "action": "deny", "cidrs": ["127.0.0.1/32"], "ports": [{"port": 8444}]},
        {"name": "allow-allowed", "action": "allow", "domains": ["allowed.example.test"]},
    ]
    return {
        "proxy": {
            "upstreamCaFile": str(pki.root_pem_path),
            "connectTo": connect_to,
            "intercept": "all",
        },
        "sources": [
            _headers_source("bearer-src", BEARER),
            _headers_source("wild-src", WILD),
            _headers_source("expired-src", EXPIRED, expiresAt=past),
            {
                "name": "cert-src",
                "resolverKind": "static_tls_client_certificate",
                "spec": {
                    "staticTLSClientCertificate": {
                        "certificatePem": cert.chain_pem.decode(),
                        "privateKeyPem": cert.key_pem.decode(),
                    }
                },
            },
        ],
        "templates": [
            {
                "name": "default",
                "spec": {
                    "network": {
                        "mode": "allow-all",
                        "egress": {"trafficRules": traffic, "credentialRules": rules},
                        "credentialBindings": bindings,
                    }
                },
            }
        ],
    }


@dataclass
class Ctx:
    proxy: ProxyProcess
    servers: dict[str, EchoServer]
    trust: ssl.SSLContext
    tokens: dict[str, str] = field(default_factory=dict)  # sandbox id -> proxy token

    def proxy_url(self, sandbox: str) -> str:
        if sandbox == "default":
            return self.proxy.url
        return f"http://{sandbox}:{self.tokens[sandbox]}@127.0.0.1:{self.proxy.port}"

    def proxy_auth(self, sandbox: str) -> str | None:
        if sandbox == "default":
            return None
        raw = f"{sandbox}:{self.tokens[sandbox]}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("explain")
    pki = TestPKI.create(base / "pki")
    cert = pki.client(CERT_CN)
    with (
        EchoServer(pki, names=TLS_HOSTS) as echo,
        EchoServer(pki, tls=False) as plain,
        EchoServer(pki, names=MTLS_HOSTS, client_cert="required", tls_max="1.3") as mtls,
    ):
        proxy = ProxyProcess(base / "proxy", build_config(pki, echo, plain, mtls, cert))
        with proxy:
            c = Ctx(
                proxy,
                {"echo": echo, "plain": plain, "mtls": mtls},
                ssl.create_default_context(cafile=str(proxy.ca_path)),
            )
            with proxy.admin() as a:
                envelope_ok(
                    a.post("/api/v1/credential-sources", json=_headers_source("rot-src", ROT_V1)),
                    201,
                )
                rotated = envelope_ok(
                    a.put(
                        "/api/v1/credential-sources/rot-src",
                        json=_headers_source("rot-src", ROT_V2),
                    ),
                    200,
                )
                assert rotated["currentVersion"] == 2
                envelope_ok(
                    a.post("/api/v1/credential-sources", json=_headers_source("own-src", OWN)), 201
                )
                sandboxes: dict[str, dict[str, Any] | None] = {
                    "sb-main": None,
                    "sb-block": {
                        "mode": "block-all",
                        "egress": {
                            "trafficRules": [
                                {
                                    "name": "allow-8443",
                                    "action": "allow",
                                    "cidrs": ["127.0.0.0/8"],
                                    "ports": [{"port": 8443}],
                                }
                            ]
                        },
                    },
                    "sb-override": {
                        "egress": {
                            "credentialRules": [
                                credential_rule(
                                    "api-v1",
                                    "own",
                                    ["api.example.test"],
                                    httpMatch={"pathPrefixes": ["/v1/"]},
                                )
                            ]
                        },
                        "credentialBindings": [
                            header_binding("own", "own-src", "X-Own-Key", "{{ .token }}")
                        ],
                    },
                }
                for sid, network in sandboxes.items():
                    body: dict[str, Any] = {"id": sid, "template": "default"}
                    if network is not None:
                        body["network"] = network
                    data = envelope_ok(a.post("/api/v1/sandboxes", json=body), 201)
                    c.tokens[sid] = data["token"]
            yield c


@dataclass(frozen=True)
class Case:
    id: str
    sandbox: str
    method: str
    url: str
    decision: str
    rule: str | None = None  # the credential rule explain must name
    traffic_rule: str | None = None  # the traffic rule explain must name
    source: str | None = None  # name@version, or the name of a missing source
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    injected: tuple[str, str] | None = None  # the header the upstream must see
    cert_cn: str | None = None  # the client certificate the upstream must see
    server: str = "echo"
    upstream_path: str | None = None  # the path the upstream must see, when it differs

    @property
    def param(self) -> Any:
        return pytest.param(self, id=self.id)


AUTH = ("Authorization", f"Bearer {BEARER}")
API = "https://api.example.test"

# fmt: off
CASES = [
    Case("prefix-get", "sb-main", "GET", f"{API}/v1/repos", "injected", "api-v1",
         source="bearer-src@1", injected=AUTH),
    Case("prefix-post", "sb-main", "POST", f"{API}/v1/repos", "injected", "api-v1",
         injected=AUTH),
    Case("method-not-listed", "sb-main", "DELETE", f"{API}/v1/repos", "passed"),
    Case("prefix-miss", "sb-main", "GET", f"{API}/v2/repos", "passed"),
    Case("dot-segments-normalised", "sb-main", "GET", f"{API}/public/%2E%2E/v1/x", "injected",
         "api-v1", injected=AUTH, upstream_path="/v1/x"),
    Case("encoded-slash-is-not-a-slash", "sb-main", "GET", f"{API}/v1%2Fx", "passed"),
    Case("exact-path-and-query", "sb-main", "GET", f"{API}/search?scope=repo", "injected",
         "api-search", injected=AUTH),
    Case("query-value-miss", "sb-main", "GET", f"{API}/search?scope=user", "passed"),
    Case("exact-path-miss", "sb-main", "GET", f"{API}/search/more?scope=repo", "passed"),
    Case("header-match", "sb-main", "GET", f"{API}/hdr", "injected", "api-hdr",
         headers=(("X-Want-Auth", "yes"),), injected=AUTH),
    Case("header-value-case-sensitive", "sb-main", "GET", f"{API}/hdr", "passed",
         headers=(("X-Want-Auth", "Yes"),)),
    Case("query-absent", "sb-main", "GET", f"{API}/nodebug", "injected", "api-nodebug",
         injected=AUTH),
    Case("query-present-refused", "sb-main", "GET", f"{API}/nodebug?debug=1", "passed"),
    Case("header-name-case-insensitive", "sb-main", "GET", f"{API}/hdr", "injected", "api-hdr",
         headers=(("x-want-auth", "yes"),), injected=AUTH),
    Case("path-case-sensitive", "sb-main", "GET", f"{API}/V1/x", "passed"),
    Case("port-not-default", "sb-main", "GET", "https://api.example.test:8443/v1/x", "passed"),
    Case("host-case-and-trailing-dot", "sb-main", "GET", "https://API.Example.Test./v1/x",
         "injected", "api-v1", injected=AUTH),
    Case("idn-domain", "sb-main", "GET", "https://bücher.example.test/", "injected", "idn",
         injected=AUTH),
    Case("inner-host-header-ignored", "sb-main", "GET", "https://wild.example.test/", "passed",
         headers=(("Host", "a.wild.example.test"),)),
    Case("unresolvable-host", "sb-main", "GET", "https://nowhere.example.test/", "denied",
         reason="unresolvable"),
    Case("trace-never-injected", "sb-main", "TRACE", f"{API}/v1/x", "passed"),
    Case("https-rule-not-over-http", "sb-main", "GET", "http://api.example.test/v1/x", "passed",
         server="plain"),
    Case("protocol-http", "sb-main", "GET", "http://plain.example.test/p/x", "injected",
         "plain-http", injected=AUTH, server="plain"),
    Case("wildcard-one-level", "sb-main", "GET", "https://a.wild.example.test/", "injected",
         "wild", source="wild-src@1", injected=("X-Api-Key", WILD)),
    Case("wildcard-two-levels", "sb-main", "GET", "https://x.y.wild.example.test/k", "injected",
         "wild", injected=("X-Api-Key", WILD)),
    Case("wildcard-not-apex", "sb-main", "GET", "https://wild.example.test/", "passed"),
    Case("deny-domain", "sb-main", "GET", "https://blocked.example.test/", "denied",
         traffic_rule="no-blocked"),
    Case("deny-cidr", "sb-main", "GET", "https://cidr.example.test:8444/", "denied",
         traffic_rule="no-8444"),
    Case("allow-rule-then-inject", "sb-main", "GET", "https://allowed.example.test/", "injected",
         "allowed", traffic_rule="allow-allowed", injected=AUTH),
    Case("fail-closed-missing", "sb-main", "GET", "https://closed.example.test/", "failed-closed",
         "closed", source="not-created", reason="missing"),
    Case("fail-open-missing", "sb-main", "GET", "https://open.example.test/", "failed-open",
         "open", source="not-created", reason="missing"),
    Case("fail-closed-expired", "sb-main", "GET", "https://expired.example.test/",
         "failed-closed", "expired", source="expired-src@1", reason="expired"),
    Case("rollout-disabled-skipped", "sb-main", "GET", "https://disabled.example.test/",
         "injected", "dis-fallback", injected=("X-Api-Key", WILD)),
    Case("rotated-source-version", "sb-main", "GET", "https://rotated.example.test/", "injected",
         "rotated", source="rot-src@2", injected=("Authorization", f"Bearer {ROT_V2}")),
    Case("mtls-certificate", "sb-main", "GET", "https://mtls.example.test/who", "injected",
         "mtls", source="cert-src@1", cert_cn=CERT_CN, server="mtls"),
    Case("mtls-fail-closed", "sb-main", "GET", "https://mtlsclosed.example.test/",
         "failed-closed", "mtls-closed", source="cert-not-created", reason="missing",
         server="mtls"),
    Case("block-all-mode", "sb-block", "GET", f"{API}/v1/x", "denied"),
    Case("block-all-plain-http", "sb-block", "GET", "http://plain.example.test/p/x", "denied",
         server="plain"),
    Case("block-all-allowed-domain", "sb-block", "GET", "https://allowed.example.test/",
         "injected", "allowed", traffic_rule="allow-allowed", injected=AUTH),
    Case("block-all-allowed-cidr", "sb-block", "GET", "https://cidr.example.test:8443/",
         "injected", "cidr-host", traffic_rule="allow-8443", injected=AUTH),
    Case("sandbox-overrides-rule", "sb-override", "GET", f"{API}/v1/x", "injected", "api-v1",
         source="own-src@1", injected=("X-Own-Key", OWN)),
    Case("sandbox-override-replaces-in-place", "sb-override", "DELETE", f"{API}/v1/x",
         "injected", "api-v1", injected=("X-Own-Key", OWN)),
    Case("default-sandbox", "default", "GET", f"{API}/v1/x", "injected", "api-v1",
         injected=AUTH),
]
# fmt: on


def raw_connect(ctx: Ctx, sandbox: str, host: str, port: int) -> tuple[int, dict[str, str], bytes]:
    """A CONNECT by hand, to read the proxy's refusal (httpx keeps only its status)."""
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
    auth = ctx.proxy_auth(sandbox)
    if auth:
        lines.append(f"Proxy-Authorization: {auth}")
    with socket.create_connection(("127.0.0.1", ctx.proxy.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, body = read_head(s)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(ctx: Ctx, case: Case) -> Answer:
    url = httpx.URL(case.url)
    trust = ctx.trust
    with httpx.Client(proxy=ctx.proxy_url(case.sandbox), verify=trust, timeout=10) as c:
        try:
            r = c.request(case.method, case.url, headers=[*case.headers, ("X-Case", case.id)])
        except httpx.ProxyError:
            # The CONNECT itself was refused: ask again by hand to read the answer.
            assert url.scheme == "https"
            status, headers, body = raw_connect(ctx, case.sandbox, url.host, url.port or 443)
            return Answer(status, headers, body)
    return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


def explain(ctx: Ctx, case: Case) -> dict[str, Any]:
    with ctx.proxy.admin() as a:
        body = {
            "method": case.method,
            "url": case.url,
            "headers": {**dict(case.headers), "X-Case": case.id},
        }
        return dict(
            envelope_ok(a.post(f"/api/v1/sandboxes/{case.sandbox}/explain", json=body), 200)
        )


def upstream_records(ctx: Ctx, case: Case) -> list[Seen]:
    return [
        s
        for name in ("echo", "plain", "mtls")
        for s in ctx.servers[name].seen.snapshot()
        if s.header("X-Case") == case.id
    ]


def source_at_version(e: dict[str, Any]) -> str | None:
    if e["source"] is None:
        return None
    return f"{e['source']}@{e['sourceVersion']}" if e["sourceVersion"] else e["source"]


@pytest.mark.parametrize("case", [c.param for c in CASES])
def test_explain_matches_the_proxy(ctx: Ctx, case: Case) -> None:
    # 1. What explain says, checked against the table so that the semantics are pinned too.
    e = explain(ctx, case)
    assert e["decision"] == case.decision, e
    if case.rule is not None:
        assert e["credentialRule"] == case.rule, e
    if case.traffic_rule is not None or case.decision == "denied":
        assert e["trafficRule"] == case.traffic_rule, e
    if case.source is not None:
        assert source_at_version(e) == case.source, e
    if case.reason is not None:
        assert e["reason"] == case.reason, e
    if case.decision in ("injected", "failed-closed", "failed-open"):
        assert e["credentialRule"] and e["binding"] and e["source"], e
    if case.decision == "passed":
        assert e["credentialRule"] is None and e["binding"] is None and e["source"] is None, e
    for secret in (BEARER, WILD, EXPIRED, ROT_V1, ROT_V2, OWN):
        assert secret not in json.dumps(e)

    # 2. The same request through the proxy, as that sandbox.
    mark = len(ctx.proxy.audit_lines())
    answer = send(ctx, case)
    seen = upstream_records(ctx, case)
    # As the proxy logs it: lowercase, IDNA, no trailing dot.
    host = httpx.URL(case.url).raw_host.decode().lower().rstrip(".")

    def audit() -> dict[str, Any]:
        """The first audit line for this request (lines are written before the answer)."""
        deadline = time.monotonic() + 5
        while True:
            for d in ctx.proxy.audit_lines()[mark:]:
                if d.get("sandbox") == case.sandbox and d.get("host") == host:
                    return d
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit line for {case.id}:\n{ctx.proxy.output()}")
            time.sleep(0.05)

    def audit_names_the_rule(line: dict[str, Any]) -> None:
        assert line["decision"] == e["decision"], line
        assert line.get("credentialRule") == e["credentialRule"], line
        assert line.get("binding") == e["binding"], line
        assert line.get("source") == source_at_version(e), line
        assert line.get("trafficRule") == e["trafficRule"], line

    decision = e["decision"]
    if decision == "injected":
        assert answer.status == 200, answer.body
        assert len(seen) == 1, seen
        if case.injected:
            name, value = case.injected
            assert seen[0].header_values(name) == [value]
        if case.cert_cn:
            assert seen[0].client_cert_subject_cn == case.cert_cn
        if case.upstream_path:
            assert seen[0].path == case.upstream_path
        line = audit()
        audit_names_the_rule(line)
        assert line["status"] == 200
    elif decision in ("passed", "failed-open"):
        assert answer.status == 200, answer.body
        assert len(seen) == 1, seen
        for name in CREDENTIAL_HEADERS:
            assert seen[0].header(name) is None, (name, seen[0].headers)
        assert seen[0].client_cert_subject_cn is None
        if decision == "failed-open":
            line = audit()
            audit_names_the_rule(line)
            assert line["reason"] == e["reason"]
            assert line["status"] == 200
        else:
            touched = [
                d
                for d in ctx.proxy.audit_lines()[mark:]
                if d.get("sandbox") == case.sandbox and d.get("decision") != "passed"
            ]
            assert touched == [], touched
    elif decision == "denied" and e["reason"] == "unresolvable":
        # Not a traffic rule: the name does not resolve, so nothing was checked or dialled.
        assert answer.status == 502, answer.body
        assert answer.headers.get("x-egress-auth-error") == "upstream_unresolvable"
        assert seen == []
        line = audit()
        assert (line["decision"], line.get("reason"), line["status"]) == (
            "denied",
            "unresolvable",
            502,
        ), line
    elif decision == "denied":
        assert answer.status == 403, answer.body
        assert answer.headers.get("x-egress-auth-error") == "egress_denied"
        body = answer.json()
        assert body["error"] == "egress_denied"
        if e["trafficRule"] is not None:
            assert body["rule"] == e["trafficRule"], body
        else:
            assert body["mode"] == "block-all", body
        assert seen == []
        line = audit()
        assert line["decision"] == "denied"
        assert line.get("trafficRule") == e["trafficRule"], line
        assert line["status"] == 403
    elif decision == "failed-closed":
        assert answer.status == 503, answer.body
        assert answer.headers.get("x-egress-auth-error") == "credential_unavailable"
        body = answer.json()
        assert body["error"] == "credential_unavailable"
        assert body["rule"] == e["credentialRule"], body
        assert body["binding"] == e["binding"], body
        assert body["source"] == e["source"], body
        assert body["reason"] == e["reason"], body
        assert seen == []
        line = audit()
        audit_names_the_rule(line)
        assert line["reason"] == e["reason"]
        assert line["status"] == 503
    else:
        pytest.fail(f"unknown decision {decision!r}")


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.decision for c in CASES} == {
        "injected",
        "passed",
        "denied",
        "failed-closed",
        "failed-open",
    }
