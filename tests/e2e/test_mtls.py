"""Client certificates presented to upstreams that demand them, on TLS 1.2 and 1.3."""

from __future__ import annotations

import time

import pytest

from .conftest import Env

pytestmark = pytest.mark.e2e

VERSIONS = [("1.3", "13"), ("1.2", "12")]


@pytest.mark.parametrize(("version", "tag"), VERSIONS)
def test_mtls_upstream_sees_the_bound_certificate(
    env: Env, mark: dict[str, int], version: str, tag: str
) -> None:
    server = env.mtls[version]
    before = len(server.seen)
    with env.client() as c:
        r = c.get(f"https://mtls{tag}.example.test/whoami")
    assert r.status_code == 200, r.text
    seen = server.seen.snapshot()[before:]
    assert seen[0].client_cert_subject_cn == "sandbox-client"
    assert seen[0].tls_version == f"TLSv{version}"


@pytest.mark.parametrize(("version", "tag"), VERSIONS)
@pytest.mark.parametrize("host", ["nocert", "wrongcert"])
def test_rejected_client_certificate_is_a_prompt_502(
    env: Env, version: str, tag: str, host: str
) -> None:
    server = env.mtls[version]
    before = len(server.seen)
    started = time.monotonic()
    with env.client() as c:
        r = c.get(f"https://{host}{tag}.example.test/")
    elapsed = time.monotonic() - started
    assert r.status_code == 502
    assert r.headers["X-Egress-Auth-Error"] == "upstream_tls_error"
    assert r.json()["error"] == "upstream_tls_error"
    # The bound for "promptly, never a hang"; the client's own timeout is 10 s.
    assert elapsed < 2.0, elapsed
    assert server.seen.snapshot()[before:] == []


@pytest.mark.parametrize(("version", "tag"), VERSIONS)
def test_rejection_reported_with_curl_too(env: Env, version: str, tag: str) -> None:
    r = env.curl("-i", f"https://wrongcert{tag}.example.test/")
    assert r.returncode == 0, r.stderr
    assert "502" in r.stdout.splitlines()[2] or " 502" in r.stdout
    assert "upstream_tls_error" in r.stdout


@pytest.mark.parametrize("tag", ["13", "12"])
def test_fail_closed_certificate_answers_503_without_dialling(env: Env, tag: str) -> None:
    server = env.mtls["1.3" if tag == "13" else "1.2"]
    errors_before = len(server.errors)
    with env.client() as c:
        r1 = c.get(f"https://mtlsclosed{tag}.example.test/a")
        r2 = c.get(f"https://mtlsclosed{tag}.example.test/b")
    for r in (r1, r2):
        assert r.status_code == 503
        assert r.json()["reason"] == "missing"
        assert r.json()["binding"] == "missing-cert"
    # No handshake reached the upstream: it was never dialled.
    assert len(server.errors) == errors_before
