"""Isolation under load: many sandboxes, one upstream host, each request carries only its own
sandbox's secret (headers over HTTP/1.1 and HTTP/2, and client certificates).

Every sandbox is created through the admin API with its own sources, bound to the same hosts
through the same template; each request names its sender in its path, so the upstream's record
maps back to who sent it.
"""

from __future__ import annotations

import random
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.support.pki import TestPKI
from tests.support.policies import cert_binding, header_binding
from tests.support.proxyproc import ProxyProcess
from tests.support.upstreams import EchoServer, H2EchoServer, Seen

from .test_admin_api import envelope_ok

pytestmark = pytest.mark.e2e

SANDBOXES = 24
HEADER_REQUESTS_PER_SANDBOX = 88  # 24 * 88 = 2112 >= 2000
CERT_REQUESTS_PER_SANDBOX = 18  # 24 * 18 = 432 >= 400

API = "api.example.test"
H2 = "h2.example.test"
MTLS = "mtls.example.test"

# (mode, weight): HTTP/1.1 on one kept-alive client, HTTP/1.1 on a new client per request,
# HTTP/2 on one kept-alive client, HTTP/2 on a new client per request.
HEADER_MODES = [("h1-keep", 4), ("h1-new", 2), ("h2-keep", 3), ("h2-new", 1)]
CERT_MODES = [("h1-keep", 2), ("h1-new", 1)]


def sandbox_id(i: int) -> str:
    return f"sbx-{i:02d}"


@dataclass
class Sandbox:
    id: str
    proxy_url: str
    secret: str
    cert_cn: str


@dataclass
class Ctx:
    proxy: ProxyProcess
    echo: EchoServer
    h2: H2EchoServer
    mtls: EchoServer
    # One trust context per protocol: httpcore sets the ALPN list on the context it is given,
    # so an HTTP/1.1 client sharing a context with an HTTP/2 one would race it to "http/1.1".
    trust: dict[bool, ssl.SSLContext]
    sandboxes: list[Sandbox] = field(default_factory=list)

    def client(self, sbx: Sandbox, http2: bool = False) -> httpx.Client:
        return httpx.Client(
            proxy=sbx.proxy_url,
            verify=self.trust[http2],
            timeout=20,
            http1=True,
            http2=http2,
        )


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("isolation")
    pki = TestPKI.create(base / "pki")
    with (
        EchoServer(pki, names=[API]) as echo,
        H2EchoServer(pki, names=[H2]) as h2,
        EchoServer(pki, names=[MTLS], client_cert="required", tls_max="1.3") as mtls,
    ):
        config = {
            "proxy": {
                "upstreamCaFile": str(pki.root_pem_path),
                "connectTo": {
                    f"{API}:443": f"127.0.0.1:{echo.port}",
                    f"{H2}:443": f"127.0.0.1:{h2.port}",
                    f"{MTLS}:443": f"127.0.0.1:{mtls.port}",
                },
                "intercept": "all",
            },
            "templates": [{"name": "default", "spec": {"network": {"mode": "allow-all"}}}],
        }
        proxy = ProxyProcess(base / "proxy", config)
        with proxy:
            trust = {
                http2: ssl.create_default_context(cafile=str(proxy.ca_path))
                for http2 in (False, True)
            }
            c = Ctx(proxy, echo, h2, mtls, trust)
            with proxy.admin() as a:
                # One template for all: the same rules for the same hosts. Its bindings point
                # at sources that never exist, so a sandbox whose own binding were lost would
                # get a 503, never someone else's secret.
                envelope_ok(
                    a.post(
                        "/api/v1/templates",
                        json={
                            "name": "iso",
                            "spec": {
                                "network": {
                                    "mode": "allow-all",
                                    "egress": {
                                        "credentialRules": [
                                            {
                                                "name": "api",
                                                "credentialRef": "key",
                                                "domains": [API, H2],
                                            },
                                            {
                                                "name": "mtls",
                                                "credentialRef": "cert",
                                                "domains": [MTLS],
                                            },
                                        ]
                                    },
                                    "credentialBindings": [
                                        header_binding("key", "no-such-key"),
                                        cert_binding("cert", "no-such-cert"),
                                    ],
                                }
                            },
                        },
                    ),
                    201,
                )
                for i in range(SANDBOXES):
                    sid = sandbox_id(i)
                    secret = f"iso_{i:02d}_" + secrets.token_urlsafe(18)
                    cert = pki.client(sid)
                    envelope_ok(
                        a.post(
                            "/api/v1/credential-sources",
                            json={
                                "name": f"hdr-{sid}",
                                "resolverKind": "static_headers",
                                "spec": {"staticHeaders": {"values": {"token": secret}}},
                            },
                        ),
                        201,
                    )
                    envelope_ok(
                        a.post(
                            "/api/v1/credential-sources",
                            json={
                                "name": f"crt-{sid}",
                                "resolverKind": "static_tls_client_certificate",
                                "spec": {
                                    "staticTLSClientCertificate": {
                                        "certificatePem": cert.chain_pem.decode(),
                                        "privateKeyPem": cert.key_pem.decode(),
                                    }
                                },
                            },
                        ),
                        201,
                    )
                    egress: dict[str, Any] = {}
                    if i % 2:
                        # Half of them also restate the rule by name: it replaces the
                        # template's in place.
                        egress["credentialRules"] = [
                            {"name": "api", "credentialRef": "key", "domains": [API, H2]}
                        ]
                    network = {
                        "egress": egress,
                        "credentialBindings": [
                            header_binding("key", f"hdr-{sid}"),
                            cert_binding("cert", f"crt-{sid}"),
                        ],
                    }
                    data = envelope_ok(
                        a.post(
                            "/api/v1/sandboxes",
                            json={"id": sid, "template": "iso", "network": network},
                        ),
                        201,
                    )
                    c.sandboxes.append(Sandbox(sid, data["proxyUrl"], secret, sid))
            yield c


@dataclass
class Outcome:
    sent: dict[str, str] = field(default_factory=dict)  # path -> sandbox id
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, path: str, sid: str) -> None:
        with self.lock:
            self.sent[path] = sid

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def _schedule(seed: int, n: int, modes: list[tuple[str, int]]) -> list[str]:
    rnd = random.Random(seed)
    names = [m for m, _ in modes]
    weights = [w for _, w in modes]
    return rnd.choices(names, weights=weights, k=n)


def _run_load(
    ctx: Ctx,
    n_per_sandbox: int,
    modes: list[tuple[str, int]],
    url_for: Callable[[str, str, int], str],
    check_response: Callable[[Sandbox, httpx.Response], str | None],
) -> Outcome:
    """One thread per sandbox; each interleaves its modes, all sandboxes run at once."""
    out = Outcome()
    start = threading.Barrier(len(ctx.sandboxes))

    def worker(idx: int, sbx: Sandbox) -> None:
        keep: dict[bool, httpx.Client] = {}
        try:
            start.wait(timeout=30)
            for n, mode in enumerate(_schedule(idx, n_per_sandbox, modes)):
                proto, conn = mode.split("-")
                http2 = proto == "h2"
                url = url_for(proto, sbx.id, n)
                path = httpx.URL(url).path
                try:
                    if conn == "keep":
                        if http2 not in keep:
                            keep[http2] = ctx.client(sbx, http2=http2)
                        r = keep[http2].get(url)
                    else:
                        with ctx.client(sbx, http2=http2) as fresh:
                            r = fresh.get(url)
                except httpx.HTTPError as e:
                    out.fail(f"{sbx.id} {mode} {path}: {type(e).__name__}: {e}")
                    continue
                problem = check_response(sbx, r)
                if problem:
                    out.fail(f"{sbx.id} {mode} {path}: {problem}")
                else:
                    out.ok(path, sbx.id)
        finally:
            for client in keep.values():
                client.close()

    with ThreadPoolExecutor(max_workers=len(ctx.sandboxes)) as pool:
        futures = [pool.submit(worker, i, s) for i, s in enumerate(ctx.sandboxes)]
        for f in futures:
            f.result(timeout=120)
    return out


def _by_path(records: list[Seen]) -> dict[str, list[Seen]]:
    out: dict[str, list[Seen]] = {}
    for s in records:
        out.setdefault(s.path, []).append(s)
    return out


def test_header_secrets_never_cross_sandboxes(ctx: Ctx) -> None:
    assert len(ctx.sandboxes) >= 20
    by_id = {s.id: s for s in ctx.sandboxes}
    owner_of = {f"Bearer {s.secret}": s.id for s in ctx.sandboxes}
    echo_before, h2_before = len(ctx.echo.seen), len(ctx.h2.seen)

    def url_for(proto: str, sid: str, n: int) -> str:
        host = H2 if proto == "h2" else API
        return f"https://{host}/iso/{sid}/{proto}/{n}"

    def check_response(sbx: Sandbox, r: httpx.Response) -> str | None:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        if r.url.host == H2 and r.http_version != "HTTP/2":
            return (
                f"expected HTTP/2 from the proxy, got {r.http_version} "
                f"(upstream: HTTP/{r.json()['httpVersion']})"
            )
        return None

    started = time.monotonic()
    out = _run_load(ctx, HEADER_REQUESTS_PER_SANDBOX, HEADER_MODES, url_for, check_response)
    elapsed = time.monotonic() - started

    total = SANDBOXES * HEADER_REQUESTS_PER_SANDBOX
    assert not out.failures, f"{len(out.failures)} of {total} requests failed: {out.failures[:5]}"
    assert len(out.sent) == total >= 2000

    records = ctx.echo.seen.snapshot()[echo_before:] + ctx.h2.seen.snapshot()[h2_before:]
    seen = _by_path(records)
    cross: list[str] = []
    wrong: list[str] = []
    for path, sender in out.sent.items():
        got = seen.get(path, [])
        if len(got) != 1:
            wrong.append(f"{path}: upstream saw it {len(got)} times")
            continue
        (s,) = got
        auth = s.header_values("Authorization")
        if auth != [f"Bearer {by_id[sender].secret}"]:
            owners = {owner_of.get(v, "?") for v in auth}
            if owners - {"?", sender}:
                cross.append(f"{path} (from {sender}) carried the secret of {sorted(owners)}")
            else:
                wrong.append(f"{path} (from {sender}): {len(auth)} Authorization value(s)")
        if s.header("Proxy-Authorization") is not None:
            wrong.append(f"{path}: Proxy-Authorization reached the upstream")
    assert len(records) == total, f"upstream saw {len(records)} requests, {total} were sent"
    h2_records = [s for s in records if s.path.startswith("/iso/") and "/h2/" in s.path]
    assert h2_records and all(s.http_version == "2" for s in h2_records)
    assert len(cross) == 0, (
        f"{len(cross)} cross-sandbox deliveries in {total} requests: {cross[:5]}"
    )
    assert not wrong, f"{len(wrong)} wrong deliveries: {wrong[:5]}"
    print(f"\n{total} header requests, 0 cross deliveries, {elapsed:.1f}s")


def test_client_certificates_never_cross_sandboxes(ctx: Ctx) -> None:
    assert len(ctx.sandboxes) >= 20
    before = len(ctx.mtls.seen)

    def url_for(proto: str, sid: str, n: int) -> str:
        return f"https://{MTLS}/iso/{sid}/cert/{n}"

    def check_response(sbx: Sandbox, r: httpx.Response) -> str | None:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        return None

    started = time.monotonic()
    out = _run_load(ctx, CERT_REQUESTS_PER_SANDBOX, CERT_MODES, url_for, check_response)
    elapsed = time.monotonic() - started

    total = SANDBOXES * CERT_REQUESTS_PER_SANDBOX
    assert not out.failures, f"{len(out.failures)} of {total} requests failed: {out.failures[:5]}"
    assert len(out.sent) == total >= 400

    records = ctx.mtls.seen.snapshot()[before:]
    seen = _by_path(records)
    cross: list[str] = []
    wrong: list[str] = []
    for path, sender in out.sent.items():
        got = seen.get(path, [])
        if len(got) != 1:
            wrong.append(f"{path}: upstream saw it {len(got)} times")
            continue
        cn = got[0].client_cert_subject_cn
        if cn != sender:
            (cross if cn else wrong).append(f"{path} (from {sender}) presented {cn!r}")
        if got[0].header("Authorization") is not None:
            wrong.append(f"{path}: an Authorization header reached the mTLS upstream")
    assert len(records) == total, f"upstream saw {len(records)} requests, {total} were sent"
    assert len(cross) == 0, (
        f"{len(cross)} cross-sandbox certificates in {total} requests: {cross[:5]}"
    )
    assert not wrong, f"{len(wrong)} wrong deliveries: {wrong[:5]}"
    print(f"\n{total} mTLS requests, 0 cross deliveries, {elapsed:.1f}s")
