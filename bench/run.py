"""The egress-auth benchmark: one command, every case side by side on the same load.

    python bench/run.py [--quick] [--out bench/results]

Starts loopback upstreams (a keep-alive HTTPS echo and an mTLS one, `upstream.py`), then the
proxies under test, then drives each workload through each case with `loadgen.py`:

cases      direct (no proxy) | mitmdump (the installed mitmproxy, no addon) |
           egress-auth, 1 rule | egress-auth, 10,000 rules across 1,000 sandboxes
workloads  sequential keep-alive | 16 concurrent keep-alive connections |
           new connection per request | mTLS upstream (new connection per request)

and writes results.json, results.md and results.png into --out, then runs the decision
micro-benchmark (`microbench.py`). See bench/README.md for what each number means.

CPU layout on a 2-core machine: every proxy runs pinned to CPU 0 (one at a time is under
load); the upstreams and the load generator share CPU 1. The direct case shows how fast
CPU 1 alone is at generating and serving the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import policygen  # noqa: E402
from tests.support.pki import TestPKI  # noqa: E402

PY = sys.executable
HOST = "127.0.0.1"
N_SANDBOXES = 1_000
RULES_PER_SANDBOX = 10
BENCH_SANDBOX = 500  # the one of the 1,000 the load authenticates as
DOWNLOAD_BYTES = 10 * 1024 * 1024

if (os.cpu_count() or 1) >= 2:
    CPU_PROXY: set[int] | None = {0}
    CPU_LOAD: set[int] | None = {1}
    # --workers 2: the proxy may use both cores; the load generator keeps CPU 1, so the
    # workers get what it leaves free.
    CPU_WORKERS: set[int] | None = {0, 1}
else:  # nothing to separate: report that nothing was pinned
    CPU_PROXY = CPU_LOAD = CPU_WORKERS = None


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    upstream: str  # echo | mtls
    mode: str  # keepalive | newconn
    concurrency: int
    path: str = policygen.BENCH_PATH
    body_bytes: int = 0  # a download's body size, for MB/s (0: a small answer)


WORKLOADS = [
    Workload("sequential", "sequential keep-alive", "echo", "keepalive", 1),
    Workload("concurrent16", "16 concurrent keep-alive", "echo", "keepalive", 16),
    # 16 at a time: enough in flight to saturate two proxy processes, not only one.
    Workload("newconn", "new connection per request (16 at a time)", "echo", "newconn", 16),
    Workload(
        "mtls", "mTLS upstream, new connection per request (16 at a time)", "mtls", "newconn", 16
    ),
    Workload(
        "download",
        "10 MiB download, one keep-alive connection",
        "echo",
        "keepalive",
        1,
        path="/v1/download",
        body_bytes=DOWNLOAD_BYTES,
    ),
]


@dataclass(frozen=True)
class Case:
    key: str
    label: str


CASES = [
    Case("direct", "direct (no proxy)"),
    Case("mitmdump", "bare mitmdump"),
    Case("ea1", "egress-auth, 1 rule"),
    Case("ea10k", "egress-auth, 10,000 rules / 1,000 sandboxes"),
    Case("eatun", "egress-auth, no rule for the host: tunnelled"),
    Case("ea10kw2", "egress-auth, 10,000 rules, --workers 2 on CPUs 0-1"),
]
PROXIES = [c.key for c in CASES if c.key != "direct"]
INTERCEPTING = ["mitmdump", "ea1", "ea10k"]  # the cases that decrypt every request
# The workloads the performance budget names (the download is there for TLS passthrough).
ISSUE_WORKLOADS = ["sequential", "concurrent16", "newconn", "mtls"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pin(cpus: set[int] | None) -> Any:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s")


def family(pid: int) -> list[int]:
    """A process and its children (the proxy processes of `run --workers N`)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *map(int, kids)]


def wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} during start-up")
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not printed within {timeout:.0f}s")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) in MiB, summed over the process and its children."""
    out: dict[str, float] = {"VmRSS": 0.0, "VmHWM": 0.0}
    for p in family(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0]) / 1024
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="egress-auth-bench-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.env_tokens: dict[str, str] = {}
        self.startup_s: dict[str, float] = {}
        self.rss_idle: dict[str, dict[str, float]] = {}
        self.bench_auth: dict[str, str] = {}
        self.rules: dict[str, int] = {}
        self.admin_token = secrets.token_urlsafe(16)
        self.populate_s = float("nan")

    # ---- set-up ------------------------------------------------------------------------------

    def pki(self) -> None:
        d = self.work / "pki"
        pki = TestPKI.create(d)
        self.server = pki.server([HOST]).write(d, "upstream")
        self.client = pki.client("egress-auth-bench-client").write(d, "client")
        self.root = pki.root_pem_path

    def start_upstreams(self) -> None:
        p = subprocess.Popen(
            [
                PY,
                str(HERE / "upstream.py"),
                "--chain",
                str(self.server.chain),
                "--key",
                str(self.server.key),
                "--client-ca",
                str(self.root),
                "--download-bytes",
                str(DOWNLOAD_BYTES),
                "--max-seconds",
                "1800",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.work / "upstream.err").open("wb"),
            preexec_fn=pin(CPU_LOAD),
        )
        self.procs["upstream"] = p
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(
                "the upstream did not start: " + (self.work / "upstream.err").read_text()
            )
        info = json.loads(line)
        self.ports["echo"], self.ports["mtls"] = info["echo"], info["mtls"]
        self.upstream_loop = info["loop"]

    def certs(self) -> None:
        """One mitmproxy CA for every proxy, so the client trusts one bundle."""
        self.certs_dir = self.work / "certs"
        subprocess.run(
            [PY, "-m", "egress_auth.cli", "ca", "--certs-dir", str(self.certs_dir)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.cafile = self.work / "client-trust.pem"
        self.cafile.write_bytes(
            (self.certs_dir / "mitmproxy-ca-cert.pem").read_bytes() + b"\n" + self.root.read_bytes()
        )

    def config(self, case: str) -> dict[str, Any]:
        echo, mtls = self.ports["echo"], self.ports["mtls"]
        cert_source = {
            "name": "bench-client-cert",
            "resolverKind": "static_tls_client_certificate",
            "spec": {
                "staticTLSClientCertificate": {
                    "certificatePem": f"${{file:{self.client.chain}}}",
                    "privateKeyPem": f"${{file:{self.client.key}}}",
                }
            },
        }

        def token_source(name: str, env: str) -> dict[str, Any]:
            self.env_tokens[env] = "bench-" + secrets.token_urlsafe(24)
            return {
                "name": name,
                "resolverKind": "static_headers",
                "spec": {"staticHeaders": {"values": {"token": f"${{env:{env}}}"}}},
            }

        def sandbox(sid: str, env: str, network: dict[str, Any]) -> dict[str, Any]:
            self.env_tokens[env] = secrets.token_urlsafe(24)
            return {"id": sid, "template": "base", "token": f"${{env:{env}}}", "network": network}

        if case == "ea10kapi":
            # Only the template and the TLS source in the file; the 1,000 sandboxes and their
            # sources come through the admin API once the proxy runs (see populate_api).
            sources = [cert_source]
            sandboxes = []
        elif case == "eatun":
            # One rule, on a host the load never asks for: every connection of the load has no
            # rule that could apply, so `intercept: matching` relays it untouched.
            sources = [token_source("tok-bench", "BENCH_SRC_TUN")]
            net = {
                "egress": {
                    "credentialRules": [
                        {"name": "other", "credentialRef": "hdr", "domains": ["api.bench.test"]}
                    ]
                },
                "credentialBindings": [policygen.header_binding("hdr", "tok-bench")],
            }
            sandboxes = [sandbox("bench", "BENCH_SBX_TUN", net)]
            self.bench_auth[case] = f"bench:{self.env_tokens['BENCH_SBX_TUN']}"
        elif case == "ea1":
            sources = [token_source("tok-bench", "BENCH_SRC_BENCH"), cert_source]
            net = policygen.one_rule_network(HOST, echo, mtls, "tok-bench", "bench-client-cert")
            sandboxes = [sandbox("bench", "BENCH_SBX_BENCH", net)]
            self.bench_auth[case] = f"bench:{self.env_tokens['BENCH_SBX_BENCH']}"
        else:  # ea10k, ea10kw2
            sources = [cert_source]
            sandboxes = []
            for i in range(N_SANDBOXES):
                sources.append(token_source(f"tok-{i:04d}", f"BENCH_SRC_{i:04d}"))
                net = policygen.sandbox_network(
                    i, HOST, echo, mtls, f"tok-{i:04d}", "bench-client-cert"
                )
                sandboxes.append(sandbox(f"sbx-{i:04d}", f"BENCH_SBX_{i:04d}", net))
            sid = f"sbx-{BENCH_SANDBOX:04d}"
            self.bench_auth[case] = f"{sid}:{self.env_tokens[f'BENCH_SBX_{BENCH_SANDBOX:04d}']}"
        return {
            "proxy": {
                "listen": f"{HOST}:{self.ports[case]}",
                "sandboxAuth": "required",
                "defaultTemplate": "base",
                # "all" for the intercepting cases, as the issue measures them; "matching"
                # (the default) is the tunnelled case.
                "intercept": "matching" if case == "eatun" else "all",
                "upstreamCaFile": str(self.root),
            },
            "admin": {"listen": f"{HOST}:{self.admin_port(case)}"},
            "sources": sources,
            "templates": [{"name": "base", "spec": {"network": {"mode": "allow-all"}}}],
            "sandboxes": sandboxes,
        }

    def admin_port(self, case: str) -> int:
        self.ports[f"{case}-admin"] = free_port()
        return self.ports[f"{case}-admin"]

    def admin(self, case: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://{HOST}:{self.ports[f'{case}-admin']}{path}",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.admin_token}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            out: dict[str, Any] = json.loads(resp.read())
        return out["data"]  # type: ignore[no-any-return]

    def populate_api(self, case: str) -> None:
        """The same 1,000 sandboxes and 10,000 rules as ea10k, created through the admin API."""
        t0 = time.monotonic()
        echo, mtls = self.ports["echo"], self.ports["mtls"]
        for i in range(N_SANDBOXES):
            token = "bench-" + secrets.token_urlsafe(24)
            self.admin(
                case,
                "/api/v1/credential-sources",
                {
                    "name": f"tok-{i:04d}",
                    "resolverKind": "static_headers",
                    "spec": {"staticHeaders": {"values": {"token": token}}},
                },
            )
            net = policygen.sandbox_network(
                i, HOST, echo, mtls, f"tok-{i:04d}", "bench-client-cert"
            )
            made = self.admin(
                case,
                "/api/v1/sandboxes",
                {"id": f"sbx-{i:04d}", "template": "base", "network": net},
            )
            if i == BENCH_SANDBOX:
                self.bench_auth[case] = f"sbx-{i:04d}:{made['token']}"
        self.rules[case] = N_SANDBOXES * RULES_PER_SANDBOX
        self.populate_s = time.monotonic() - t0

    def start_egress_auth(self, case: str) -> None:
        self.ports[case] = free_port()
        d = self.work / case
        d.mkdir()
        cfg = self.config(case)
        path = d / "egress-auth.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rules = sum(len(s["network"]["egress"]["credentialRules"]) for s in cfg["sandboxes"])
        self.rules[case] = rules
        env = {
            **os.environ,
            **self.env_tokens,
            "EGRESS_AUTH_ADMIN_TOKEN": self.admin_token,
            "PYTHONPATH": str(ROOT / "src"),
        }
        p = subprocess.Popen(
            [
                PY,
                "-m",
                "egress_auth.cli",
                "run",
                "--config",
                str(path),
                "--certs-dir",
                str(self.certs_dir),
                "--data-dir",
                str(d / "data"),
                *(["--workers", "2"] if case == "ea10kw2" else []),
            ],
            stdin=subprocess.DEVNULL,
            # Audit lines (one per injected request) go to a file, as a deployment would.
            stdout=(d / "stdout.log").open("wb"),
            stderr=(d / "stderr.log").open("wb"),
            env=env,
            cwd=d,
            preexec_fn=pin(CPU_WORKERS if case == "ea10kw2" else CPU_PROXY),
        )
        self.procs[case] = p
        try:
            self.startup_s[case] = wait_port(self.ports[case], p, 180, f"egress-auth ({case})")
            if case == "ea10kw2":  # the port opens with the first process; wait for all
                self.startup_s[case] += wait_log(d / "stdout.log", "egress-auth proxy:", p, 180)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{(d / 'stderr.log').read_text()[-3000:]}") from None

    def start_mitmdump(self) -> None:
        case = "mitmdump"
        self.ports[case] = free_port()
        d = self.work / case
        d.mkdir()
        exe = Path(PY).parent / "mitmdump"
        cmd = (
            [str(exe)]
            if exe.exists()
            else [PY, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]
        )
        cmd += [
            "--listen-host",
            HOST,
            "--listen-port",
            str(self.ports[case]),
            "--set",
            f"confdir={self.certs_dir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.root}",
            "--set",
            "connection_strategy=eager",
            "--set",
            "stream_large_bodies=1m",
            # Presented only to upstreams that ask for a certificate: the mTLS one.
            "--set",
            f"client_certs={self.client.bundle}",
            "-q",
        ]
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=(d / "stdout.log").open("wb"),
            stderr=(d / "stderr.log").open("wb"),
            cwd=d,
            preexec_fn=pin(CPU_PROXY),
        )
        self.procs[case] = p
        self.startup_s[case] = wait_port(self.ports[case], p, 60, "mitmdump")
        self.bench_auth[case] = "bench:unused"  # sent like to egress-auth; mitmdump ignores it

    # ---- measuring ---------------------------------------------------------------------------

    def loadgen(self, case: str, w: Workload, warmup: float, duration: float) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "target_host": HOST,
            "target_port": self.ports[w.upstream],
            "mode": w.mode,
            "concurrency": w.concurrency,
            "warmup_s": warmup,
            "duration_s": duration,
            "cafile": str(self.cafile),
            "path": w.path,
            "watch": {"upstream": self.procs["upstream"].pid},
        }
        if w.upstream == "mtls" and case in ("direct", "eatun"):
            # Direct, and through a tunnel, the client's own certificate reaches the upstream.
            spec["client_cert"], spec["client_key"] = str(self.client.chain), str(self.client.key)
        if case != "direct":
            spec.update(
                proxy_host=HOST, proxy_port=self.ports[case], proxy_auth=self.bench_auth[case]
            )
            spec["watch"]["proxy"] = family(self.procs[case].pid)
        out = subprocess.run(
            [PY, str(HERE / "loadgen.py"), json.dumps(spec)],
            capture_output=True,
            timeout=warmup + duration + 60,
            preexec_fn=pin(CPU_LOAD),
        )
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed ({case}/{w.key}): {out.stderr.decode()[-3000:]}")
        res: dict[str, Any] = json.loads(out.stdout)
        if case != "direct":
            res["proxy_status"] = proc_status(self.procs[case].pid)
        return res

    def measure(self) -> dict[str, Any]:
        a = self.args
        cells: dict[str, dict[str, list[dict[str, Any]]]] = {
            w.key: {c.key: [] for c in CASES} for w in WORKLOADS
        }
        total = a.rounds * len(WORKLOADS) * len(CASES)
        n = 0
        for r in range(a.rounds):
            # Rotate the order every round, so drift (thermal, caches) spreads over all cases.
            order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
            for w in WORKLOADS:
                for c in order:
                    n += 1
                    res = self.loadgen(c.key, w, a.warmup, a.duration)
                    cells[w.key][c.key].append(res)
                    print(
                        f"[{n:>2}/{total}] round {r + 1} {w.key:<13} {c.key:<9} "
                        f"{res['rps']:>9.1f} req/s  p50 {res['p50_ms']:.3f} ms  "
                        f"errors {res['errors']}",
                        flush=True,
                    )
        return cells

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.pki()
        self.start_upstreams()
        self.certs()
        self.start_mitmdump()
        self.start_egress_auth("ea1")
        self.start_egress_auth("ea10k")
        self.start_egress_auth("eatun")
        self.start_egress_auth("ea10kw2")
        time.sleep(1.0)
        for case in PROXIES:
            self.rss_idle[case] = proc_status(self.procs[case].pid)
        print(
            "started: "
            + ", ".join(f"{k} in {v:.1f}s" for k, v in self.startup_s.items())
            + f"; upstream loop {self.upstream_loop}",
            flush=True,
        )
        cells = self.measure()
        rss_end = {case: proc_status(self.procs[case].pid) for case in PROXIES}
        self.stop(tuple(PROXIES))
        api = self.api_variant() if self.args.api_sandboxes else None
        self.stop()
        micro = self.microbench()
        return {
            "api_variant": api,
            "meta": self.meta(time.monotonic() - t0),
            "startup_s": self.startup_s,
            "rules": getattr(self, "rules", {}),
            "rss_idle_mib": self.rss_idle,
            "rss_end_mib": rss_end,
            "cells": cells,
            "summary": summarize(cells),
            "microbench": micro,
        }

    def api_variant(self) -> dict[str, Any]:
        """Opt-in (--api-sandboxes): the 10k rules created through the admin API instead of
        the config file. Memory only, plus one short pass of each workload; the request path
        is the same code as ea10k's. Creating them takes minutes (each write rebuilds)."""
        case = "ea10kapi"
        self.start_egress_auth(case)
        time.sleep(1.0)
        idle_before = proc_status(self.procs[case].pid)
        print(
            f"creating {N_SANDBOXES:,} sandboxes and sources through the admin API...", flush=True
        )
        self.populate_api(case)
        time.sleep(1.0)
        idle = proc_status(self.procs[case].pid)
        passes = {}
        for w in WORKLOADS:
            r = self.loadgen(case, w, 0.5, 2.0)
            passes[w.key] = {k: r[k] for k in ("rps", "p50_ms", "errors", "auth_true", "requests")}
        out = {
            "create_s": self.populate_s,
            "rss_before_create_mib": idle_before,
            "rss_idle_mib": idle,
            "rss_end_mib": proc_status(self.procs[case].pid),
            "short_pass": passes,
        }
        self.stop((case,))
        return out

    def microbench(self) -> dict[str, Any]:
        out = self.work / "microbench.json"
        cmd = [PY, str(HERE / "microbench.py"), "--json", str(out)]
        if self.args.quick:
            cmd.append("--quick")
        subprocess.run(
            cmd, check=True, timeout=900, preexec_fn=pin(CPU_PROXY), stdout=subprocess.DEVNULL
        )
        res: dict[str, Any] = json.loads(out.read_text())
        return res

    def meta(self, elapsed: float) -> dict[str, Any]:
        import mitmproxy.version

        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True
        ).stdout.strip()
        cpu = "?"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        return {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": self.args.quick,
            "rounds": self.args.rounds,
            "warmup_s": self.args.warmup,
            "duration_s": self.args.duration,
            "elapsed_s": round(elapsed, 1),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "mitmproxy": mitmproxy.version.VERSION,
            "commit": commit + ("+local-changes" if dirty else ""),
            "pinning": {
                "proxy": sorted(CPU_PROXY) if CPU_PROXY else "not pinned",
                "loadgen+upstreams": sorted(CPU_LOAD) if CPU_LOAD else "not pinned",
            },
            "upstream_loop": self.upstream_loop,
            # Other work on the machine shows here: the benchmark wants an idle machine.
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "workloads": {w.key: w.label for w in WORKLOADS},
            "cases": {c.key: c.label for c in CASES},
            "sandboxes": N_SANDBOXES,
            "bench_sandbox": f"sbx-{BENCH_SANDBOX:04d}",
        }

    def stop(self, names: tuple[str, ...] | None = None) -> None:
        for name, p in list(self.procs.items()):
            if names is not None and name not in names:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            self.procs.pop(name)

    def cleanup(self) -> None:
        self.stop()
        if self.args.keep_workdir:
            print(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


# ---- summarising ---------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in WORKLOADS:
        row: dict[str, Any] = {}
        for c in CASES:
            runs = cells[w.key][c.key]
            reqs = sum(r["requests"] for r in runs)
            proxy_cpu = sum(r["cpu_s"].get("proxy", 0.0) for r in runs)
            load_cpu = sum(r["cpu_s"]["loadgen"] + r["cpu_s"]["upstream"] for r in runs)
            window = sum(r["cpu_window_s"] for r in runs)
            s: dict[str, Any] = {
                "rps": _median([r["rps"] for r in runs]),
                "rps_min": min(r["rps"] for r in runs),
                "rps_max": max(r["rps"] for r in runs),
                "p50_ms": _median([r["p50_ms"] for r in runs]),
                "p95_ms": _median([r["p95_ms"] for r in runs]),
                "p99_ms": _median([r["p99_ms"] for r in runs]),
                "mib_s": _median([r["rps"] for r in runs]) * w.body_bytes / (1 << 20),
                "requests": reqs,
                "errors": sum(r["errors"] for r in runs),
                "injected": sum(r["auth_true"] for r in runs),
                "client_cert": sum(r["cert_true"] for r in runs),
                # The load side's core: load generator + upstreams, as a share of one CPU.
                "load_core_busy": load_cpu / window if window else float("nan"),
                "loadgen_cpu_per_1k": 1000 * sum(r["cpu_s"]["loadgen"] for r in runs) / reqs
                if reqs
                else float("nan"),
            }
            if c.key != "direct":
                s["cpu_s_per_1k"] = 1000 * proxy_cpu / reqs if reqs else float("nan")
                s["proxy_core_busy"] = proxy_cpu / window if window else float("nan")
                s["rss_mib"] = max(r["proxy_status"]["VmRSS"] for r in runs)
                s["hwm_mib"] = max(r["proxy_status"]["VmHWM"] for r in runs)
            # What each case must show, or its numbers are not what they claim to be.
            problems = []
            if s["errors"]:
                problems.append(f"{s['errors']} errors")
            wants_auth = c.key in ("ea1", "ea10k", "ea10kw2") and w.upstream == "echo"
            if wants_auth and s["injected"] != reqs:
                problems.append(f"injected on {s['injected']} of {reqs}")
            if not wants_auth and s["injected"]:
                problems.append(f"unexpected Authorization on {s['injected']}")
            if w.upstream == "mtls" and s["client_cert"] != reqs:
                problems.append(f"client certificate on {s['client_cert']} of {reqs}")
            s["problems"] = problems
            row[c.key] = s
        best_proxy = max(row[c]["rps"] for c in INTERCEPTING)
        row["_headroom"] = row["direct"]["rps"] / best_proxy if best_proxy else float("nan")
        base = row["mitmdump"]
        for c in ("ea1", "ea10k"):
            row[c]["rps_vs_mitmdump"] = row[c]["rps"] / base["rps"] if base["rps"] else float("nan")
            row[c]["p50_added_ms"] = row[c]["p50_ms"] - base["p50_ms"]
        w2, w1 = row["ea10kw2"], row["ea10k"]
        w2["rps_vs_1worker"] = w2["rps"] / w1["rps"] if w1["rps"] else 0.0
        w2["cpu_vs_1worker"] = w2["cpu_s_per_1k"] / w1["cpu_s_per_1k"] if w1["rps"] else 0.0
        # The CPU the load generator and upstreams left for the proxy on 2 cores.
        w2["free_cores"] = 2.0 - w2["load_core_busy"]
        tun = row["eatun"]
        tun["rps_vs_direct"] = tun["rps"] / row["direct"]["rps"] if row["direct"]["rps"] else 0.0
        tun["rps_vs_intercepted"] = tun["rps"] / row["ea1"]["rps"] if row["ea1"]["rps"] else 0.0
        out[w.key] = row
    return out


def _label(key: str) -> str:
    return next(w.label for w in WORKLOADS if w.key == key)


def budget(res: dict[str, Any]) -> list[tuple[str, str, bool]]:
    lines: list[tuple[str, str, bool]] = []
    summ = res["summary"]
    for w in WORKLOADS:
        if w.key not in ISSUE_WORKLOADS:
            continue  # the download workload is the passthrough issue's; its lines are below
        s = summ[w.key]["ea10k"]
        lines.append(
            (
                f"{w.label}: egress-auth 10k rules >= 97% of mitmdump req/s",
                f"{s['rps_vs_mitmdump'] * 100:.1f}%",
                s["rps_vs_mitmdump"] >= 0.97,
            )
        )
        lines.append(
            (
                f"{w.label}: adds <= 0.1 ms to p50",
                f"{s['p50_added_ms'] * 1000:+.0f} µs",
                s["p50_added_ms"] <= 0.1,
            )
        )
    for key, b in res["microbench"]["budget"].items():
        if key.endswith("/decide"):
            layout = key.split("/")[0]
            lines.append(
                (
                    f"decision (match + render, {layout}) < 10 µs at every size",
                    f"max {b['max_us']:.2f} µs",
                    b["under_10us"],
                )
            )
            lines.append(
                (
                    f"decision ({layout}) grows < 20% from {b['from_rules']:,}"
                    f" to {b['to_rules']:,} rules",
                    f"{b['growth'] * 100:+.1f}%",
                    b["growth_under_20pct"],
                )
            )
    added = res["rss_end_mib"]["ea10k"]["VmRSS"] - res["rss_end_mib"]["ea1"]["VmRSS"]
    added_idle = res["rss_idle_mib"]["ea10k"]["VmRSS"] - res["rss_idle_mib"]["ea1"]["VmRSS"]
    lines.append(
        (
            "10,000 rules / 1,000 sandboxes add <= 64 MB RSS (vs 1 rule, after the load)",
            f"{added:+.1f} MiB (idle: {added_idle:+.1f} MiB)",
            added <= 64 and added_idle <= 64,
        )
    )
    api = res.get("api_variant")
    if api:
        added_api = api["rss_idle_mib"]["VmRSS"] - res["rss_idle_mib"]["ea1"]["VmRSS"]
        lines.append(
            (
                "same 10,000 rules created through the admin API add <= 64 MB RSS"
                " (idle, vs 1 rule)",
                f"{added_api:+.1f} MiB",
                added_api <= 64,
            )
        )
    for key, want in (("newconn", 3.0), ("mtls", 3.0)):
        tun = summ[key]["eatun"]
        # No proxy can beat direct: when direct itself is under 3x intercepted, the load
        # side is the ceiling, so say how far the tunnel got towards it.
        ceiling = summ[key]["direct"]["rps"] / summ[key]["ea1"]["rps"]
        lines.append(
            (
                f"{_label(key)}: tunnelled >= 3x intercepted (egress-auth 1 rule) req/s",
                f"{tun['rps_vs_intercepted']:.1f}x (direct: {ceiling:.1f}x; tunnelled"
                f" {tun['rps_vs_direct'] * 100:.0f}% of direct)",
                tun["rps_vs_intercepted"] >= want,
            )
        )
    for w in WORKLOADS:
        w2 = summ[w.key]["ea10kw2"]
        lines.append(
            (
                f"{w.label}: --workers 2 CPU s / 1k req within 10% of 1 worker",
                f"{(w2['cpu_vs_1worker'] - 1) * 100:+.1f}%",
                w2["cpu_vs_1worker"] <= 1.10,
            )
        )
        if w.concurrency > 1:  # one connection lives in one process: nothing to spread
            lines.append(
                (
                    f"{w.label}: --workers 2 use the CPU the load leaves (busy >= 90% of free)",
                    f"{w2['rps_vs_1worker']:.2f}x req/s; busy {w2['proxy_core_busy']:.2f}"
                    f" of {w2['free_cores']:.2f} free",
                    w2["proxy_core_busy"] >= 0.9 * w2["free_cores"],
                )
            )
    tun = summ["download"]["eatun"]
    lines.append(
        (
            "10 MiB download: tunnelled >= 80% of direct throughput",
            f"{tun['rps_vs_direct'] * 100:.1f}% ({tun['mib_s']:,.0f} MiB/s)",
            tun["rps_vs_direct"] >= 0.8,
        )
    )
    busy = max(summ[w.key]["ea10k"]["load_core_busy"] for w in WORKLOADS)
    lines.append(
        (
            "load generator is not the bottleneck: its core <= 50% busy in every ea 10k run",
            f"max {busy:.0%}",
            busy <= 0.5,
        )
    )
    headroom = min(summ[w.key]["_headroom"] for w in WORKLOADS)
    lines.append(
        (
            "load generator is not the bottleneck: direct >= 3x the fastest proxy, every workload",
            f"min {headroom:.1f}x",
            headroom >= 3,
        )
    )
    return lines


# ---- reports -------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    summ = res["summary"]
    out = [
        "# egress-auth benchmark results",
        "",
        f"{m['date']}, commit {m['commit']}, {'quick' if m['quick'] else 'full'} run "
        f"({m['rounds']} round(s) of {m['warmup_s']} s warm-up + {m['duration_s']} s measured "
        f"per cell, case order rotated each round; {m['elapsed_s']} s in all). "
        f"{m['cores']} x {m['cpu']}; Python {m['python']}, mitmproxy {m['mitmproxy']}. "
        f"Proxy pinned to CPU {m['pinning']['proxy']}, load generator and upstreams to CPU "
        f"{m['pinning']['loadgen+upstreams']} ({m['upstream_loop']} event loop). egress-auth "
        f"10k: {res['rules'].get('ea10k', 0):,} credential rules in {m['sandboxes']:,} sandboxes; "
        f"the load authenticates as {m['bench_sandbox']}.",
        "",
        "Requests/s: median of the rounds (min-max). Latency: median of the rounds' "
        "percentiles, milliseconds. CPU: the proxy process's utime+stime per 1,000 requests. "
        "RSS: the proxy's VmRSS after the workload's runs.",
        "",
    ]
    for w in WORKLOADS:
        row = summ[w.key]
        out += [
            f"### {w.label}",
            "",
            "| case | req/s | vs mitmdump | p50 ms | p95 ms | p99 ms | CPU s / 1k req | RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in CASES:
            s = row[c.key]
            vs = f"{s['rps_vs_mitmdump'] * 100:.1f}%" if "rps_vs_mitmdump" in s else ""
            cpu = f"{s['cpu_s_per_1k']:.3f}" if "cpu_s_per_1k" in s else "-"
            rss = f"{s['rss_mib']:.0f}" if "rss_mib" in s else "-"
            flag = f" **{'; '.join(s['problems'])}**" if s["problems"] else ""
            mib = f"; {s['mib_s']:,.0f} MiB/s" if w.body_bytes else ""
            out.append(
                f"| {c.label}{flag} | {s['rps']:,.0f} "
                f"({s['rps_min']:,.0f}-{s['rps_max']:,.0f}{mib}) "
                f"| {vs} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['p99_ms']:.3f} "
                f"| {cpu} | {rss} |"
            )
        out.append("")
    out += [
        "### --workers 2 beside 1 worker (egress-auth, 10,000 rules)",
        "",
        "1 worker is pinned to CPU 0; the 2 workers may use CPUs 0 and 1, and share CPU 1"
        " with the load generator and the upstreams, so they can only use what those leave."
        " Free cores: 2 minus how busy the load side kept its core during the 2-worker run."
        " A single connection lives in one process, so the one-connection workloads cannot"
        " spread.",
        "",
        "| workload | 1 worker req/s | 2 workers req/s | ratio | CPU s / 1k: 1 | 2"
        " | proxy busy (cores): 2 workers | free cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        row = summ[w.key]
        one, two = row["ea10k"], row["ea10kw2"]
        out.append(
            f"| {w.label} | {one['rps']:,.0f} | {two['rps']:,.0f} | {two['rps_vs_1worker']:.2f}x "
            f"| {one['cpu_s_per_1k']:.3f} | {two['cpu_s_per_1k']:.3f} "
            f"| {two['proxy_core_busy']:.2f} | {two['free_cores']:.2f} |"
        )
    out += [
        "",
        "### TLS passthrough: tunnelled beside direct and intercepted",
        "",
        "`intercept: matching` relays a connection untouched when no credential rule of the"
        " sandbox could apply to its host and port. Intercepted here is egress-auth with 1 rule"
        " (`intercept: all`), the same process code on the same request.",
        "",
        "| workload | direct req/s | tunnelled req/s | intercepted req/s | tunnelled / direct"
        " | tunnelled / intercepted | proxy CPU s / 1k: tunnelled | intercepted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        row = summ[w.key]
        d, t, i = row["direct"], row["eatun"], row["ea1"]
        out.append(
            f"| {w.label} | {d['rps']:,.0f} | {t['rps']:,.0f} | {i['rps']:,.0f} "
            f"| {t['rps_vs_direct'] * 100:.1f}% | {t['rps_vs_intercepted']:.1f}x "
            f"| {t['cpu_s_per_1k']:.3f} | {i['cpu_s_per_1k']:.3f} |"
        )
    out += [
        "",
        "### Load generator headroom",
        "",
        "Direct req/s over the fastest proxy's; how busy the load core (load generator +"
        " upstreams, CPU 1) and the proxy core were during the egress-auth 10k runs; and how"
        " much CPU one request costs the proxy compared with the load generator.",
        "",
        "| workload | direct / fastest proxy | load core busy: direct"
        " | load core busy: ea 10k | proxy core busy: ea 10k | proxy CPU / loadgen CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        row = summ[w.key]
        ea = row["ea10k"]
        out.append(
            f"| {w.label} | {row['_headroom']:.1f}x | {row['direct']['load_core_busy']:.0%} "
            f"| {ea['load_core_busy']:.0%} | {ea['proxy_core_busy']:.0%} "
            f"| {ea['cpu_s_per_1k'] / ea['loadgen_cpu_per_1k']:.1f}x |"
        )
    out += [
        "",
        "### Memory and start-up",
        "",
        "RSS idle: 1 s after start-up, before any request. After load: at the end of all runs.",
        "",
        "| proxy | start-up s | RSS idle MiB | RSS after load MiB | peak (VmHWM) MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("mitmdump", "bare mitmdump"),
        ("ea1", "egress-auth, 1 rule"),
        ("ea10k", "egress-auth, 10k rules (config file)"),
        ("eatun", "egress-auth, tunnelled case (1 rule, another host)"),
        ("ea10kw2", "egress-auth, 10k rules, --workers 2 (both processes)"),
    ):
        out.append(
            f"| {label} | {res['startup_s'][key]:.1f} | {res['rss_idle_mib'][key]['VmRSS']:.1f} "
            f"| {res['rss_end_mib'][key]['VmRSS']:.1f} | {res['rss_end_mib'][key]['VmHWM']:.1f} |"
        )
    api = res.get("api_variant")
    if api:
        out.append(
            f"| egress-auth, 10k rules (admin API; created in {api['create_s']:.0f} s) "
            f"| {res['startup_s']['ea10kapi']:.1f} | {api['rss_idle_mib']['VmRSS']:.1f} "
            f"| {api['rss_end_mib']['VmRSS']:.1f} (one short pass) "
            f"| {api['rss_end_mib']['VmHWM']:.1f} |"
        )
    out += ["", "### Decision micro-benchmark (`bench/microbench.py`)", ""]
    sys.path.insert(0, str(HERE))
    import microbench

    out.append(microbench.markdown(res["microbench"]))
    out += ["", "### Budget", "", "| line | measured | holds |", "|---|---:|---|"]
    for line, value, ok in budget(res):
        out.append(f"| {line} | {value} | {'yes' if ok else '**no**'} |")
    return "\n".join(out) + "\n"


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG")
        return False
    summ = res["summary"]
    colors = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#937860"]
    short = {"direct": "direct", "mitmdump": "mitmdump", "ea1": "ea 1", "ea10k": "ea 10k"}
    short["eatun"] = "ea tunnel"
    short["ea10kw2"] = "ea 10k x2"
    names = [short[c.key] for c in CASES]
    fig, axes = plt.subplots(4, len(WORKLOADS), figsize=(4.4 * len(WORKLOADS), 16))
    for j, w in enumerate(WORKLOADS):
        row = summ[w.key]
        ax = axes[0][j]
        vals = [row[c.key]["rps"] for c in CASES]
        errs = [
            [row[c.key]["rps"] - row[c.key]["rps_min"] for c in CASES],
            [row[c.key]["rps_max"] - row[c.key]["rps"] for c in CASES],
        ]
        ax.bar(range(len(CASES)), vals, color=colors, yerr=errs, capsize=3)
        ax.set_yscale("log")
        ax.set_title(f"{w.label}\nrequests/s (log)", fontsize=9)
        ax.set_ylim(top=max(vals) * 1.6)
        ax.set_xticks(range(len(CASES)), names, fontsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax = axes[1][j]
        width = 0.27
        for k, (q, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
            ax.bar(
                [i + (k - 1) * width for i in range(len(CASES))],
                [row[c.key][q] for c in CASES],
                width,
                label=label,
                alpha=0.5 + 0.25 * k,
                color=["#4c72b0", "#dd8452", "#c44e52"][k],
            )
        ax.set_title("latency ms", fontsize=9)
        ax.set_xticks(range(len(CASES)), names, fontsize=7)
        if j == 0:
            ax.legend(fontsize=7)
        ax = axes[2][j]
        proxies = PROXIES
        ax.bar(range(len(proxies)), [row[c]["cpu_s_per_1k"] for c in proxies], color=colors[1:])
        ax.set_xticks(range(len(proxies)), [short[c] for c in proxies], fontsize=7)
        ax.set_title("proxy CPU s per 1,000 requests", fontsize=9)
        ax.set_ylim(0, 1.3 * max(row[c]["cpu_s_per_1k"] for c in proxies))
        for i, c in enumerate(proxies):
            v = row[c]["cpu_s_per_1k"]
            ax.text(
                i, v, f"{v:.3f}\n{row[c]['rss_mib']:.0f} MiB", ha="center", va="bottom", fontsize=7
            )
    for j, layout in enumerate(("one-policy", "sandboxes")):
        ax = axes[3][j]
        rows = [r for r in res["microbench"]["rows"] if r["layout"] == layout]
        xs = [r["rules"] for r in rows]
        for metric in ("decide", "verdict", "facts+verdict"):
            ax.plot(xs, [r[metric]["median_ns"] / 1000 for r in rows], marker="o", label=metric)
        ax.axhline(10, color="red", linestyle="--", linewidth=1, label="10 µs budget")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("credential rules", fontsize=8)
        ax.set_title(f"decision micro-benchmark, {layout}: µs per request", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[3][2]
    ax.bar(
        [i - 0.2 for i in range(len(PROXIES))],
        [res["rss_idle_mib"][n]["VmRSS"] for n in PROXIES],
        0.4,
        label="idle",
    )
    ax.bar(
        [i + 0.2 for i in range(len(PROXIES))],
        [res["rss_end_mib"][n]["VmRSS"] for n in PROXIES],
        0.4,
        label="after load",
    )
    ax.set_xticks(range(len(PROXIES)), [short[c] for c in PROXIES], fontsize=7)
    ax.set_title("proxy RSS MiB", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes[3][4:]:
        ax.axis("off")
    ax = axes[3][3]
    ax.axis("off")
    text = "\n".join(
        f"{'ok  ' if ok else 'FAIL'} {value:>14}  {line[:52]}" for line, value, ok in budget(res)
    )
    ax.text(0, 1, "budget\n" + text, va="top", family="monospace", fontsize=6)
    m = res["meta"]
    fig.suptitle(
        f"egress-auth benchmark, {m['date']} ({'quick' if m['quick'] else 'full'}), "
        f"{m['cores']} cores, proxy on CPU {m['pinning']['proxy']}, load on CPU "
        f"{m['pinning']['loadgen+upstreams']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


@contextlib.contextmanager
def bench(args: argparse.Namespace) -> Iterator[Bench]:
    b = Bench(args)
    try:
        yield b
    finally:
        b.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description="egress-auth benchmark (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="one short round (about 3 minutes)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float, help="measured seconds per cell and round")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each measurement")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument(
        "--api-sandboxes",
        action="store_true",
        help="also create the 10k rules through the admin API and measure that RSS (slow)",
    )
    p.add_argument(
        "--from-json", type=Path, help="only re-render results.md / results.png from this JSON"
    )
    args = p.parse_args()
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(markdown(res))
        plot(res, args.out / "results.png")
        return
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.5 if args.quick else 6.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.0)
    if not all(1 <= x <= 600 for x in (args.rounds, args.duration)):
        p.error("rounds and duration must be between 1 and 600")
    with bench(args) as b:
        res = b.run()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (args.out / "results.md").write_text(md)
    plotted = plot(res, args.out / "results.png")
    print()
    print(md)
    print(
        f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
        + (f", {args.out / 'results.png'}" if plotted else "")
    )


if __name__ == "__main__":
    main()
