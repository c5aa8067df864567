"""Sources through restarts, crashes, concurrent writes, rotation under load and rekeying."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.pki import TestPKI
from tests.support.proxyproc import ProxyProcess
from tests.support.upstreams import EchoServer

from .test_admin_api import admin_config, envelope_ok, headers_source, tls_source

pytestmark = pytest.mark.e2e

ROT_OLD = "rot_old_Q1w2E3r4"
ROT_NEW = "rot_new_T5y6U7i8"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def upstreams(pki: TestPKI) -> Iterator[tuple[EchoServer, EchoServer]]:
    with (
        EchoServer(
            pki, names=["api.example.test", "declared.example.test", "basic.example.test"]
        ) as echo,
        EchoServer(pki, names=["mtls.example.test"], client_cert="required", tls_max="1.3") as mtls,
    ):
        yield echo, mtls


def _proxy(
    tmp: Path, pki: TestPKI, ups: tuple[EchoServer, EchoServer], env: dict[str, str] | None = None
) -> ProxyProcess:
    return ProxyProcess(tmp, admin_config(pki, *ups), env=env)


def _client(proxy: ProxyProcess) -> httpx.Client:
    trust = ssl.create_default_context(cafile=str(proxy.ca_path))
    return httpx.Client(proxy=proxy.url, verify=trust, timeout=10)


def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(f, f.read_bytes()) for f in folder.rglob("*") if f.is_file()]


def test_sources_survive_restart_and_nothing_plain_is_on_disk(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    cert = pki.client("restart-client")
    secrets = ["restart_tok_Aa99", "restart_pw_Bb88"]
    proxy = _proxy(tmp_path, pki, upstreams)
    with proxy, proxy.admin() as a:
        envelope_ok(
            a.post(
                "/api/v1/credential-sources", json=headers_source("api-token", "first_version_tok")
            ),
            201,
        )
        envelope_ok(
            a.put(
                "/api/v1/credential-sources/api-token", json=headers_source("api-token", secrets[0])
            ),
            200,
        )
        envelope_ok(
            a.post(
                "/api/v1/credential-sources",
                json={
                    "name": "api-basic",
                    "resolverKind": "static_username_password",
                    "spec": {"staticUsernamePassword": {"username": "bot", "password": secrets[1]}},
                },
            ),
            201,
        )
        envelope_ok(a.post("/api/v1/credential-sources", json=tls_source("api-cert", cert)), 201)
        before = envelope_ok(a.get("/api/v1/credential-sources"), 200)
    with proxy, proxy.admin() as a, _client(proxy) as c:
        after = envelope_ok(a.get("/api/v1/credential-sources"), 200)
        # Stored sources keep names, versions, timestamps and certificate facts. (Declared
        # ones are re-read from the file: their times are those of this process.)
        stored = [s for s in before if s["origin"] == "api"]
        assert len(stored) == 3
        assert [s for s in after if s["origin"] == "api"] == stored
        echo = upstreams[0]
        n = len(echo.seen)
        assert c.get("https://api.example.test/").status_code == 200
        assert echo.seen.snapshot()[n].header("Authorization") == f"Bearer {secrets[0]}"
    needles = [s.encode() for s in [*secrets, "first_version_tok"]]
    needles += [line.encode() for line in cert.key_pem.decode().splitlines()[1:-1]]
    for path, data in _all_bytes(proxy.data_dir):
        for needle in needles:
            assert needle not in data, f"{needle!r} in {path}"


def test_fifty_parallel_puts_lose_nothing(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    proxy = _proxy(tmp_path, pki, upstreams)
    with proxy, proxy.admin() as a:
        envelope_ok(
            a.post("/api/v1/credential-sources", json=headers_source("api-token", "t0")), 201
        )

        def put(i: int) -> int:
            with proxy.admin() as mine:
                r = mine.put(
                    "/api/v1/credential-sources/api-token",
                    json=headers_source("api-token", f"t{i}"),
                )
                return int(envelope_ok(r, 200)["currentVersion"])

        with ThreadPoolExecutor(max_workers=50) as pool:
            versions = sorted(pool.map(put, range(1, 51)))
        assert versions == list(range(2, 52))  # each PUT got its own version
        final = envelope_ok(a.get("/api/v1/credential-sources/api-token"), 200)
        assert final["currentVersion"] == 51


def test_kill_9_during_writes_keeps_every_acknowledged_write(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    proxy = _proxy(tmp_path, pki, upstreams)
    acked: dict[str, int] = {}
    proxy.start()
    stop = threading.Event()

    def writer(name: str) -> None:
        with proxy.admin() as a:
            try:
                r = a.post("/api/v1/credential-sources", json=headers_source(name, "v"))
                acked[name] = envelope_ok(r, 201)["currentVersion"]
                while not stop.is_set():
                    r = a.put(
                        f"/api/v1/credential-sources/{name}",
                        json=headers_source(name, f"v{acked[name] + 1}"),
                    )
                    if r.status_code != 200:
                        return
                    acked[name] = r.json()["data"]["currentVersion"]
            except httpx.HTTPError:
                return  # the process died under us: what was acknowledged is in `acked`

    threads = [threading.Thread(target=writer, args=(f"crash-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while sum(acked.values()) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.kill()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert sum(acked.values()) >= 40, acked
    with proxy, proxy.admin() as a:
        stored = {s["name"]: s for s in envelope_ok(a.get("/api/v1/credential-sources"), 200)}
        for name, version in acked.items():
            assert stored[name]["currentVersion"] >= version
            assert stored[name]["status"] == "ready"
            # The row opens: a PUT builds on it.
            r = a.put(f"/api/v1/credential-sources/{name}", json=headers_source(name, "after"))
            assert envelope_ok(r, 200)["currentVersion"] == stored[name]["currentVersion"] + 1


def test_rotation_under_load_never_sends_the_old_value_after_the_put(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    echo = upstreams[0]
    proxy = _proxy(tmp_path, pki, upstreams)
    with proxy, proxy.admin() as a:
        envelope_ok(
            a.post("/api/v1/credential-sources", json=headers_source("api-token", ROT_OLD)), 201
        )
        stop = threading.Event()
        # (sent_at, path): each request carries a unique path so the upstream record maps
        # back to when the client sent it.
        sent: dict[str, float] = {}

        def load(worker: int) -> None:
            with _client(proxy) as c:
                i = 0
                while not stop.is_set() and i < 2000:
                    path = f"/rot/{worker}/{i}"
                    sent[path] = time.monotonic()
                    assert c.get(f"https://api.example.test{path}").status_code == 200
                    i += 1

        n = len(echo.seen)
        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        envelope_ok(
            a.put(
                "/api/v1/credential-sources/api-token", json=headers_source("api-token", ROT_NEW)
            ),
            200,
        )
        put_returned = time.monotonic()
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(timeout=20)
    seen = echo.seen.snapshot()[n:]
    values = [s.header("Authorization") for s in seen]
    assert set(values) <= {f"Bearer {ROT_OLD}", f"Bearer {ROT_NEW}"}
    assert f"Bearer {ROT_OLD}" in values and f"Bearer {ROT_NEW}" in values
    late_old = [
        s.path
        for s in seen
        if sent[s.path] > put_returned and s.header("Authorization") == f"Bearer {ROT_OLD}"
    ]
    assert late_old == []
    assert len(seen) >= 50


def test_wrong_or_missing_master_key_stops_start_up_in_one_line(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    proxy = _proxy(tmp_path, pki, upstreams)
    with proxy, proxy.admin() as a:
        envelope_ok(
            a.post("/api/v1/credential-sources", json=headers_source("api-token", "k")), 201
        )
    key_file = proxy.data_dir / "master.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (proxy.data_dir / "admin-token").exists() is False  # token came from the env

    def start_fails(env: dict[str, str]) -> str:
        r = subprocess.run(
            proxy.command(),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env={**proxy.env, **env},
        )
        assert r.returncode == 1
        # The config's warnings may come first; the reason is one line, the last.
        lines = [ln for ln in r.stderr.strip().splitlines() if ": warning: " not in ln]
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("egress-auth: ")
        return lines[0]

    wrong = base64.b64encode(os.urandom(32)).decode()
    assert "does not open the store" in start_fails({"EGRESS_AUTH_MASTER_KEY": wrong})
    key_file.rename(tmp_path / "saved.key")
    assert "master key is missing" in start_fails({})
    (tmp_path / "saved.key").rename(key_file)


def test_rekey_reencrypts_everything(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    proxy = _proxy(tmp_path, pki, upstreams)
    with proxy, proxy.admin() as a:
        envelope_ok(
            a.post(
                "/api/v1/credential-sources", json=headers_source("api-token", "rekey_tok_Zz11")
            ),
            201,
        )
        envelope_ok(
            a.post("/api/v1/credential-sources", json=tls_source("api-cert", pki.client("rekey"))),
            201,
        )
        # While the proxy runs, rekey refuses: it holds the data dir.
        new_key_file = tmp_path / "new.key"
        new_key = base64.b64encode(os.urandom(32)).decode()
        new_key_file.write_text(new_key + "\n")
        r = _rekey(proxy, new_key_file)
        assert r.returncode == 1 and "stop it" in r.stderr
    old_key = (proxy.data_dir / "master.key").read_text().strip()
    r = _rekey(proxy, new_key_file)
    assert r.returncode == 0, r.stderr
    assert "rekeyed 2 sources" in r.stdout
    assert (proxy.data_dir / "master.key").read_text().strip() == new_key
    # Starts on the new key, serves the old secret; the old key no longer opens the store.
    with proxy, _client(proxy) as c:
        echo = upstreams[0]
        n = len(echo.seen)
        assert c.get("https://api.example.test/").status_code == 200
        assert echo.seen.snapshot()[n].header("Authorization") == "Bearer rekey_tok_Zz11"
    r = subprocess.run(
        proxy.command(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**proxy.env, "EGRESS_AUTH_MASTER_KEY": old_key},
    )
    assert r.returncode == 1 and "does not open the store" in r.stderr


def _rekey(proxy: ProxyProcess, key_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "egress_auth.cli",
            "rekey",
            "--new-key-file",
            str(key_file),
            "--data-dir",
            str(proxy.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=proxy.env,
    )


def test_no_secret_in_answers_logs_or_metrics_for_every_kind(
    tmp_path: Path, pki: TestPKI, upstreams: tuple[EchoServer, EchoServer]
) -> None:
    cert = pki.client("leak-check")
    header_secret, password = "leak_hdr_Pp00Oo", "leak_pw_Ll99Kk"
    answers: list[str] = []
    proxy = _proxy(tmp_path, pki, upstreams)
    bodies: list[dict[str, Any]] = [
        headers_source("api-token", header_secret),
        {
            "name": "api-basic",
            "resolverKind": "static_username_password",
            "spec": {"staticUsernamePassword": {"username": "bot", "password": password}},
        },
        tls_source("api-cert", cert),
    ]
    with proxy, proxy.admin() as a, _client(proxy) as c:
        for body in bodies:
            for r in (
                a.post("/api/v1/credential-sources", json=body),
                a.post("/api/v1/credential-sources", json=body),  # 409
                a.put(
                    f"/api/v1/credential-sources/{body['name']}",
                    json={**body, "resolverKind": "static_headers"},
                ),  # 400
                a.put(f"/api/v1/credential-sources/{body['name']}", json=body),
                a.get(f"/api/v1/credential-sources/{body['name']}"),
                a.get("/api/v1/credential-sources"),
            ):
                answers.append(r.text + str(r.headers))
        for url in (
            "https://api.example.test/",
            "https://basic.example.test/",
            "https://mtls.example.test/",
        ):
            assert c.get(url).status_code == 200
        answers.append(a.get("/metrics").text)
        answers.append(a.get("/openapi.json").text)
    basic = base64.b64encode(f"bot:{password}".encode()).decode()
    needles = [header_secret, password, basic]
    needles += cert.key_pem.decode().splitlines()[1:-1]
    logs = proxy.output()
    assert '"decision": "injected"' in logs
    for needle in needles:
        assert needle not in logs
        for text in answers:
            assert needle not in text
