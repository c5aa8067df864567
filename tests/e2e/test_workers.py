"""`run --workers N`: N proxy processes on one port, one admin API, one store (SPEC section 4).

A real `egress-auth run --workers 2`, a real TLS echo upstream, httpx clients opening a new
connection per request (the kernel spreads connections, not requests, over the processes).
"""

from __future__ import annotations

import os
import signal
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
from tests.support.policies import header_binding
from tests.support.proxyproc import ProxyProcess, free_port
from tests.support.upstreams import EchoServer

from .test_admin_api import envelope_ok, headers_source

pytestmark = pytest.mark.e2e

HOST = "api.workers.test"
SECRET_1 = "wrk_secret_one_Ab12Cd"
SECRET_2 = "wrk_secret_two_Ef34Gh"
SECRET_3 = "wrk_secret_three_Ij56Kl"
SILENCE = 6  # seconds a worker may go silent before it is replaced (the smallest allowed)
# New connections per check: with 2 processes, the chance that all land on one is 2**-23.
N = 24


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Ctx:
    def __init__(self, pki: TestPKI, proxy: ProxyProcess, echo: EchoServer) -> None:
        self.pki, self.proxy, self.echo = pki, proxy, echo

    def get_each_new(self, proxy_url: str, n: int = N) -> list[httpx.Response]:
        """n requests, each on a new client connection."""
        out = []
        for _ in range(n):
            with httpx.Client(
                proxy=proxy_url, verify=self.trust(), timeout=10, trust_env=False
            ) as c:
                out.append(c.get(f"https://{HOST}/v1/x"))
        return out

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.proxy.ca_path))

    def url(self, sandbox: str, token: str) -> str:
        return f"http://{sandbox}:{token}@127.0.0.1:{self.proxy.port}"

    def sandbox(self, sandbox_id: str, rule: str, source: str, secret: str | None = None) -> str:
        """Create (with `secret`: the source too) a sandbox whose rule injects `source`; the
        proxy URL with its token."""
        with self.proxy.admin() as a:
            if secret is not None:
                body = headers_source(source, secret)
                envelope_ok(a.post("/api/v1/credential-sources", json=body), 201)
            net = {
                "egress": {
                    "credentialRules": [{"name": rule, "credentialRef": "tok", "domains": [HOST]}]
                },
                "credentialBindings": [header_binding("tok", source)],
            }
            body = {"id": sandbox_id, "template": "base", "network": net}
            made = envelope_ok(a.post("/api/v1/sandboxes", json=body), 201)
        return self.url(sandbox_id, made["token"])

    def workers_seen(self, since: int) -> set[int]:
        return {line.get("worker", -1) for line in self.proxy.audit_lines()[since:]}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    base = tmp_path_factory.mktemp("workers")
    pki = TestPKI.create(base / "pki")
    with EchoServer(pki, names=[HOST]) as echo:
        config = {
            "proxy": {
                "upstreamCaFile": str(pki.root_pem_path),
                "connectTo": {f"{HOST}:443": f"127.0.0.1:{echo.port}"},
                "sandboxAuth": "required",
                "intercept": "all",
                "defaultTemplate": "base",
            },
            "templates": [{"name": "base", "spec": {"network": {"mode": "allow-all"}}}],
        }
        proxy = ProxyProcess(
            base / "proxy",
            config,
            args=["--workers", "2"],
            env={"EGRESS_AUTH_WORKER_TIMEOUT": str(SILENCE)},
        )
        with proxy:
            yield Ctx(pki, proxy, echo)
        # Whatever the tests did, no secret reached any output of any process.
        out = proxy.output() + (base / "proxy" / "stdout.log").read_text()
        for secret in (SECRET_1, SECRET_2, SECRET_3, "wrk_secret_stuck_Mn78Op"):
            assert secret not in out


def test_start_announces_and_runs_two_processes(ctx: Ctx) -> None:
    assert ctx.proxy.proc is not None
    _wait(lambda: "egress-auth workers: 2" in ctx.proxy.output(), 5, "the announcement")
    workers = _children(ctx.proxy.proc.pid)
    assert len(workers) == 1, workers
    with ctx.proxy.admin() as a:
        text = a.get("/metrics").text
    assert "egress_auth_proxy_workers_ready 2.0" in text


def test_api_writes_reach_every_process_before_the_answer(ctx: Ctx) -> None:
    url = ctx.sandbox("wk-a", "api", "wk", SECRET_1)
    # No wait: the answer came after both processes applied the write.
    since = len(ctx.proxy.audit_lines())
    responses = ctx.get_each_new(url)
    assert [r.status_code for r in responses] == [200] * N
    assert [r.json()["headers"].get("authorization") for r in responses] == [
        f"Bearer {SECRET_1}"
    ] * N
    assert ctx.workers_seen(since) == {0, 1}  # both processes served the new sandbox

    # A rotation: every request sent after the PUT answered carries the new value.
    with ctx.proxy.admin() as a:
        body = {
            "resolverKind": "static_headers",
            "spec": {"staticHeaders": {"values": {"token": SECRET_2}}},
        }
        envelope_ok(a.put("/api/v1/credential-sources/wk", json=body), 200)
    responses = ctx.get_each_new(url)
    assert {r.json()["headers"].get("authorization") for r in responses} == {f"Bearer {SECRET_2}"}

    # A deletion: the token opens nothing in any process once DELETE answered.
    with ctx.proxy.admin() as a:
        envelope_ok(a.delete("/api/v1/sandboxes/wk-a"), 200)
    since = len(ctx.proxy.audit_lines())
    statuses = []
    for _ in range(N):
        with httpx.Client(proxy=url, verify=ctx.trust(), timeout=10, trust_env=False) as c:
            try:
                statuses.append(c.get(f"https://{HOST}/v1/x").status_code)
            except httpx.ProxyError as e:
                statuses.append(407 if "407" in str(e) else -1)
    assert statuses == [407] * N


def test_metrics_sum_every_process(ctx: Ctx) -> None:
    url = ctx.sandbox("wk-m", "metered", "wm", SECRET_3)
    since = len(ctx.proxy.audit_lines())
    responses = ctx.get_each_new(url)
    assert all(r.status_code == 200 for r in responses)
    assert ctx.workers_seen(since) == {0, 1}
    with ctx.proxy.admin() as a:
        text = a.get("/metrics").text
    assert f'egress_auth_injections_total{{rule="metered"}} {N}' in text
    assert SECRET_3 not in text


def test_a_stuck_worker_delays_a_write_by_the_budget_only(ctx: Ctx) -> None:
    """A worker that does not answer its sync (stopped) must not hang the admin API: the
    write answers after the 1 s budget, the warning names the worker, and once it runs
    again it catches up with the store."""
    assert ctx.proxy.proc is not None
    (worker,) = [p for p in _children(ctx.proxy.proc.pid) if _alive(p)]
    url = ctx.sandbox("wk-s", "stuck", "ws", "wrk_secret_stuck_Mn78Op")
    os.kill(worker, signal.SIGSTOP)
    try:
        with ctx.proxy.admin() as a:
            body = {
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": "wrk_secret_stuck2_Qr90St"}}},
            }
            envelope_ok(a.put("/api/v1/credential-sources/ws", json=body), 200)
        _wait(
            lambda: "proxy workers [1] did not apply change" in ctx.proxy.output(),
            5,
            "the warning",
        )
    finally:
        os.kill(worker, signal.SIGCONT)
    # Any later write answers after every process applied everything before it (the control
    # socket is in order), so from then on the stopped worker has caught up too.
    with ctx.proxy.admin() as a:
        body = {"name": "after-stuck", "spec": {"network": {"mode": "allow-all"}}}
        envelope_ok(a.post("/api/v1/templates", json=body), 201)
    # Caught up: every new connection, in either process, gets the new value.
    since = len(ctx.proxy.audit_lines())
    responses = ctx.get_each_new(url)
    assert {r.json()["headers"].get("authorization") for r in responses} == {
        "Bearer wrk_secret_stuck2_Qr90St"
    }
    assert ctx.workers_seen(since) == {0, 1}


def test_a_hung_worker_is_replaced(ctx: Ctx) -> None:
    """Stopped (not exited), a worker would keep its share of the port and leave connections
    waiting: after SILENCE seconds without an answer it is killed and started again."""
    assert ctx.proxy.proc is not None
    (hung,) = [p for p in _children(ctx.proxy.proc.pid) if _alive(p)]
    os.kill(hung, signal.SIGSTOP)
    _wait(lambda: not _alive(hung), SILENCE + 10, "the hung worker to be killed")
    assert "proxy worker 1 did not answer for" in ctx.proxy.output()

    def ready() -> bool:
        with ctx.proxy.admin() as a:
            return "egress_auth_proxy_workers_ready 2.0" in a.get("/metrics").text

    _wait(ready, 30, "a new worker to be ready")
    (new,) = [p for p in _children(ctx.proxy.proc.pid) if _alive(p)]
    assert new != hung
    since = len(ctx.proxy.audit_lines())
    responses = ctx.get_each_new(ctx.sandbox("wk-h", "hung", "wm"))
    assert {r.json()["headers"].get("authorization") for r in responses} == {f"Bearer {SECRET_3}"}
    assert ctx.workers_seen(since) == {0, 1}


def test_a_killed_worker_is_started_again(ctx: Ctx) -> None:
    assert ctx.proxy.proc is not None
    (old,) = _children(ctx.proxy.proc.pid)
    os.kill(old, signal.SIGKILL)
    _wait(
        lambda: [p for p in _children(ctx.proxy.proc.pid) if p != old and _alive(p)],  # type: ignore[union-attr]
        15,
        "a new worker process",
    )
    (new,) = [p for p in _children(ctx.proxy.proc.pid) if _alive(p)]
    assert new != old

    def ready() -> bool:
        with ctx.proxy.admin() as a:
            return "egress_auth_proxy_workers_ready 2.0" in a.get("/metrics").text

    _wait(ready, 30, "the new worker to be ready")
    assert "proxy worker 1 exited" in ctx.proxy.output()
    # The new process read the store when it started (the source "wm" was created before)
    # and follows it since (the sandbox is created now).
    url = ctx.sandbox("wk-r", "after", "wm")
    since = len(ctx.proxy.audit_lines())
    responses = ctx.get_each_new(url)
    assert {r.json()["headers"].get("authorization") for r in responses} == {f"Bearer {SECRET_3}"}
    assert ctx.workers_seen(since) == {0, 1}


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "egress_auth.cli",
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp / "data"),
            "--certs-dir",
            str(tmp / "certs"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp,
        env={**os.environ, "EGRESS_AUTH_CONFIG": ""},
    )
    return proc, port


def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, "--workers", "3")
    try:
        _wait(lambda: len([p for p in _children(proc.pid) if _alive(p)]) == 2, 30, "2 workers")
        assert proc.stdout is not None
        workers = _children(proc.pid)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        _wait(lambda: not any(_alive(p) for p in workers), 10, "the workers to stop")
    finally:
        proc.kill()
        proc.wait()


def test_workers_stop_when_the_first_process_dies(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, "--workers", "2")
    try:
        _wait(lambda: len([p for p in _children(proc.pid) if _alive(p)]) == 1, 30, "a worker")
        (worker,) = _children(proc.pid)
        time.sleep(0.5)
        proc.kill()  # no shutdown code runs
        proc.wait(timeout=5)
        _wait(lambda: not _alive(worker), 10, "the orphaned worker to stop")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be between 1 and 64, not 0"),
        (["--workers", "two"], "--workers: not a whole number: 'two'"),
    ],
)
def test_bad_worker_counts_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc, _ = _start(tmp_path, *args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert message in err.decode()
