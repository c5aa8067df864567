"""The process as users run it: start-up failures, SIGHUP reload, `mitmdump -s`, `env`, `ca`."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.pki import TestPKI
from tests.support.proxyproc import ProxyProcess, free_port, read_head
from tests.support.upstreams import EchoServer, wait_port

pytestmark = pytest.mark.e2e

TOKEN_V1 = "reload_tok_v1_Aa11"
TOKEN_V2 = "reload_tok_v2_Bb22"


def _cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egress_auth.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def _config(pki: TestPKI, echo: EchoServer, token: str, domain: str) -> dict[str, Any]:
    return {
        "proxy": {
            "upstreamCaFile": str(pki.root_pem_path),
            "intercept": "all",
            "connectTo": {
                f"{d}:443": f"127.0.0.1:{echo.port}"
                for d in ("one.example.test", "two.example.test")
            },
        },
        "sources": [
            {
                "name": "tok",
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": token}}},
            }
        ],
        "templates": [
            {
                "name": "default",
                "spec": {
                    "network": {
                        "egress": {
                            "credentialRules": [
                                {"name": "r", "credentialRef": "b", "domains": [domain]}
                            ]
                        },
                        "credentialBindings": [
                            {
                                "ref": "b",
                                "sourceRef": "tok",
                                "projection": {
                                    "type": "http_headers",
                                    "httpHeaders": {
                                        "headers": [
                                            {
                                                "name": "Authorization",
                                                "valueTemplate": "Bearer {{ .token }}",
                                            }
                                        ]
                                    },
                                },
                            }
                        ],
                    }
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def echo(pki: TestPKI) -> Iterator[EchoServer]:
    with EchoServer(pki, names=["one.example.test", "two.example.test"]) as srv:
        yield srv


def _get(proxy_url: str, ca: Path, url: str) -> httpx.Response:
    trust = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(proxy=proxy_url, verify=trust, timeout=10) as c:
        return c.get(url)


def _auth_seen(echo: EchoServer, before: int) -> list[list[str]]:
    return [s.header_values("Authorization") for s in echo.seen.snapshot()[before:]]


def test_sighup_reloads_and_keeps_running_policy_on_a_bad_file(
    tmp_path: Path, pki: TestPKI, echo: EchoServer
) -> None:
    proxy = ProxyProcess(tmp_path, _config(pki, echo, TOKEN_V1, "one.example.test"))
    with proxy:
        n = len(echo.seen)
        _get(proxy.url, proxy.ca_path, "https://one.example.test/")
        assert _auth_seen(echo, n) == [[f"Bearer {TOKEN_V1}"]]

        # A new rotation + a rule moved to another host.
        new = _config(pki, echo, TOKEN_V2, "two.example.test")
        new["proxy"]["listen"] = f"127.0.0.1:{proxy.port}"
        proxy.write_config(new)
        proxy.reload()
        deadline = time.monotonic() + 10
        while "config reloaded" not in proxy.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "config reloaded" in proxy.output()
        n = len(echo.seen)
        _get(proxy.url, proxy.ca_path, "https://one.example.test/")
        _get(proxy.url, proxy.ca_path, "https://two.example.test/")
        assert _auth_seen(echo, n) == [[], [f"Bearer {TOKEN_V2}"]]
        line = proxy.wait_audit(lambda d: d.get("host") == "two.example.test")
        assert line["source"] == "tok@2"  # a changed declared source gains a version

        # A broken file is refused with its errors; the running policy stays.
        proxy.config_path.write_text("templates:\n  - name: default\n    bogus: 1\n")
        proxy.reload()
        deadline = time.monotonic() + 10
        while "reload refused" not in proxy.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = proxy.output()
        assert "reload refused" in out
        assert "templates[0].bogus: unknown field" in out
        n = len(echo.seen)
        _get(proxy.url, proxy.ca_path, "https://two.example.test/")
        assert _auth_seen(echo, n) == [[f"Bearer {TOKEN_V2}"]]
    assert TOKEN_V1 not in proxy.output() and TOKEN_V2 not in proxy.output()


def test_mitmdump_script_entry(tmp_path: Path, pki: TestPKI, echo: EchoServer) -> None:
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent))
    assert mitmdump, "mitmdump is installed with mitmproxy"
    repo = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "cfg.yaml"
    import yaml

    config = _config(pki, echo, TOKEN_V1, "one.example.test")
    # No front under mitmdump: a host without a rule is tunnelled by mitmproxy itself.
    config["proxy"]["intercept"] = "matching"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(pki.root_pem)
    proc = subprocess.Popen(
        [
            mitmdump,
            "-q",
            "-s",
            str(repo / "addons" / "egress_auth.py"),
            "--set",
            f"egress_auth_config={cfg}",
            "--set",
            f"confdir={tmp_path / 'certs'}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={bundle}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
        ],
        stdout=(tmp_path / "out.log").open("wb"),
        stderr=subprocess.STDOUT,
    )

    def output() -> bytes:
        return (tmp_path / "out.log").read_bytes()

    try:
        try:
            wait_port("127.0.0.1", port, timeout=20)
            n = len(echo.seen)
            r = _get(
                f"http://127.0.0.1:{port}",
                tmp_path / "certs" / "mitmproxy-ca-cert.pem",
                "https://one.example.test/",
            )
        except Exception:
            proc.terminate()
            proc.wait(timeout=10)
            print(output().decode())
            raise
        assert r.status_code == 200
        assert _auth_seen(echo, n) == [[f"Bearer {TOKEN_V1}"]]
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"CONNECT two.example.test:443 HTTP/1.1\r\n\r\n")
        assert read_head(sock)[0].startswith(b"HTTP/1.1 200")
        tls = ssl.create_default_context(cafile=str(pki.root_pem_path)).wrap_socket(
            sock, server_hostname="two.example.test"
        )  # verified against the upstream's own root: not intercepted
        tls.sendall(b"GET /t HTTP/1.1\r\nHost: two.example.test\r\nConnection: close\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        tls.close()
        # The tunnel's audit line is written when mitmproxy has closed it.
        deadline = time.monotonic() + 5
        while b'"decision": "tunnelled"' not in output() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    out = output()
    assert TOKEN_V1.encode() not in out, out
    assert b'"decision": "tunnelled"' in out and b'"host": "two.example.test"' in out, out


def test_run_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy:\n  listen: nowhere\n")
    r = _cli(
        "run",
        "--config",
        str(bad),
        "--certs-dir",
        str(tmp_path / "c"),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bad.yaml:2:" in lines[0] and "proxy.listen" in lines[0]


def test_run_refuses_a_taken_port_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli(
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--certs-dir",
            str(tmp_path / "c"),
            "--data-dir",
            str(tmp_path / "d"),
            cwd=tmp_path,
        )
    assert r.returncode == 1
    assert r.stderr.strip() == f"egress-auth: proxy address 127.0.0.1:{port} is already in use"


def test_run_on_embedded_defaults_prints_urls(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "egress_auth.cli", "run", "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "EGRESS_AUTH_CONFIG"},
    )
    try:
        wait_port("127.0.0.1", port, timeout=20)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert f"egress-auth proxy: http://127.0.0.1:{port}" in out
    assert f"egress-auth CA: {tmp_path / 'certs' / 'mitmproxy-ca-cert.pem'}" in out
    assert (tmp_path / "certs" / "mitmproxy-ca-cert.pem").exists()


def test_ca_and_env_commands(tmp_path: Path) -> None:
    r = _cli("ca", "--certs-dir", str(tmp_path / "certs"))
    assert r.returncode == 0
    ca = Path(r.stdout.strip())
    assert ca.name == "mitmproxy-ca-cert.pem" and ca.exists()
    r = _cli(
        "env",
        "--certs-dir",
        str(tmp_path / "certs"),
        "--proxy",
        "http://127.0.0.1:9999",
        "--sandbox",
        "ci-runner",
        "--token",
        "t0k",
    )
    assert r.returncode == 0
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    assert exports["HTTPS_PROXY"] == "http://ci-runner:t0k@127.0.0.1:9999"
    assert exports["HTTP_PROXY"] == exports["HTTPS_PROXY"]
    for var in (
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
        "AWS_CA_BUNDLE",
    ):
        assert exports[var] == str(ca)
    assert "NO_PROXY" in exports


def test_example_config_checks_clean() -> None:
    repo = Path(__file__).resolve().parents[2]
    r = _cli("check", "--config", str(repo / "config" / "egress-auth.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout


def test_block_all_reaches_only_what_traffic_rules_allow(
    tmp_path: Path, pki: TestPKI, echo: EchoServer
) -> None:
    # CIDR rules match the address the proxy actually dials (after connectTo and DNS):
    # one.example.test dials 127.0.0.1 (allowed), two.example.test dials 127.0.0.2 (not).
    config = _config(pki, echo, TOKEN_V1, "one.example.test")
    config["proxy"]["connectTo"]["two.example.test:443"] = f"127.0.0.2:{echo.port}"
    network = config["templates"][0]["spec"]["network"]
    network["mode"] = "block-all"
    network["egress"]["trafficRules"] = [
        {
            "name": "loopback-one",
            "action": "allow",
            "cidrs": ["127.0.0.1/32"],
            "ports": [{"port": 443}],
        },
    ]
    proxy = ProxyProcess(tmp_path, config)
    with proxy:
        n = len(echo.seen)
        assert _get(proxy.url, proxy.ca_path, "https://one.example.test/").status_code == 200
        with pytest.raises(httpx.ProxyError) as denied:
            _get(proxy.url, proxy.ca_path, "https://two.example.test/")
        assert "403" in str(denied.value)
        line = proxy.wait_audit(lambda d: d.get("host") == "two.example.test")
        assert line["decision"] == "denied"
        assert "trafficRule" not in line  # refused by mode block-all, no rule matched
    assert _auth_seen(echo, n) == [[f"Bearer {TOKEN_V1}"]]
