"""Smoke test of bench/: the pieces work on a tiny scale (a few seconds, no proxy).

The benchmark itself (`python bench/run.py`) is not a test and is never timed here.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.pki import TestPKI

BENCH = Path(__file__).resolve().parents[2] / "bench"
DOWNLOAD_BYTES = 3 * 1024 * 1024 + 7  # several TLS records and socket reads, an odd tail


def _module(name: str) -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_microbench_decides_and_reports() -> None:
    micro = _module("microbench")
    res = micro.run(sizes=(10, 1_000), iterations=200, repeats=2)
    assert [(r["layout"], r["rules"]) for r in res["rows"]] == [
        ("one-policy", 10),
        ("one-policy", 1_000),
        ("sandboxes", 10),
        ("sandboxes", 1_000),
    ]
    for row in res["rows"]:
        assert row["matched_rule"].startswith("v1-")
        for metric in ("decide", "verdict", "facts+verdict"):
            assert 0 < row[metric]["median_ns"] < 10_000_000
    assert set(res["budget"]) >= {"one-policy/decide", "sandboxes/decide"}
    assert "| one-policy | 1,000 |" in micro.markdown(res)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("bench-pki")
    pki = TestPKI.create(d)
    server = pki.server(["127.0.0.1"]).write(d, "server")
    client = pki.client("bench-smoke").write(d, "client")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH / "upstream.py"),
            "--chain",
            str(server.chain),
            "--key",
            str(server.key),
            "--client-ca",
            str(pki.root_pem_path),
            "--max-seconds",
            "60",
            "--download-bytes",
            str(DOWNLOAD_BYTES),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        yield ports, pki, client, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("upstream_name", "mode", "concurrency", "path"),
    [
        ("echo", "keepalive", 2, "/v1/bench"),
        ("echo", "newconn", 2, "/v1/bench"),
        ("mtls", "newconn", 2, "/v1/bench"),
        ("echo", "keepalive", 1, "/v1/download"),
    ],
)
def test_loadgen_direct(
    upstream: Any, upstream_name: str, mode: str, concurrency: int, path: str
) -> None:
    ports, pki, client, pid = upstream
    loadgen = _module("loadgen")
    spec = loadgen.Spec(
        target_host="127.0.0.1",
        target_port=ports[upstream_name],
        mode=mode,
        concurrency=concurrency,
        warmup_s=0.1,
        duration_s=0.4,
        cafile=str(pki.root_pem_path),
        max_requests=20_000,
        watch={"upstream": pid},
        path=path,
    )
    if upstream_name == "mtls":
        spec.client_cert, spec.client_key = str(client.chain), str(client.key)
    res = loadgen.run_spec(spec, use_uvloop=False)
    assert res["errors"] == 0, res["error_kinds"]
    assert res["requests"] > 0
    assert res["p50_ms"] <= res["p99_ms"]
    assert res["auth_true"] == 0  # nothing injects on a direct run
    if upstream_name == "mtls":
        assert res["cert_true"] == res["requests"]
    assert res["cpu_s"]["upstream"] >= 0
    if path == "/v1/download":
        # Every counted response was a whole download: the load generator read exactly
        # Content-Length bytes per response, or the next response's head would not parse.
        assert res["body_bytes"] == res["completed"] * DOWNLOAD_BYTES


def test_report_from_synthetic_cells() -> None:
    run = _module("run")

    def cell(rps: float, auth: bool, cert: bool, proxy: bool) -> dict[str, Any]:
        n = int(rps * 2)
        r: dict[str, Any] = {
            "requests": n,
            "rps": rps,
            "p50_ms": 1000 / rps,
            "p95_ms": 1200 / rps,
            "p99_ms": 1500 / rps,
            "errors": 0,
            "auth_true": n if auth else 0,
            "cert_true": n if cert else 0,
            "cpu_window_s": 2.0,
            "cpu_s": {"loadgen": 0.2, "upstream": 0.1},
        }
        if proxy:
            r["cpu_s"]["proxy"] = 1.9
            r["proxy_status"] = {"VmRSS": 100.0, "VmHWM": 110.0}
        return r

    cells = {
        w.key: {
            c.key: [
                cell(
                    {
                        "direct": 9000.0,
                        "mitmdump": 1000.0,
                        "ea1": 990.0,
                        "ea10k": 980.0,
                        "eatun": 7500.0,
                        "ea10kw2": 1800.0,
                    }[c.key],
                    c.key in ("ea1", "ea10k", "ea10kw2") and w.upstream == "echo",
                    w.upstream == "mtls",
                    c.key != "direct",
                )
            ]
            for c in run.CASES
        }
        for w in run.WORKLOADS
    }
    summary = run.summarize(cells)
    assert all(not summary[w.key][c.key]["problems"] for w in run.WORKLOADS for c in run.CASES)
    assert math.isclose(summary["sequential"]["ea10k"]["rps_vs_mitmdump"], 0.98)
    status = {"VmRSS": 100.0, "VmHWM": 110.0}
    res = {
        "meta": {
            "date": "now",
            "commit": "abc",
            "quick": True,
            "rounds": 1,
            "warmup_s": 0.5,
            "duration_s": 2,
            "elapsed_s": 1,
            "cores": 2,
            "cpu": "x",
            "python": "3",
            "mitmproxy": "11",
            "pinning": {"proxy": [0], "loadgen+upstreams": [1]},
            "upstream_loop": "asyncio",
            "sandboxes": 1000,
            "bench_sandbox": "sbx-0500",
        },
        "startup_s": {c: 1.0 for c in run.PROXIES},
        "rules": {"ea1": 2, "ea10k": 10_000, "eatun": 1},
        "rss_idle_mib": {c: status for c in run.PROXIES},
        "rss_end_mib": {c: status for c in run.PROXIES},
        "summary": summary,
        "microbench": _module("microbench").run(sizes=(10,), iterations=50, repeats=1),
        "api_variant": None,
    }
    md = run.markdown(res)
    assert "### Budget" in md and "| sequential keep-alive |" in md
    lines = {line: ok for line, _, ok in run.budget(res)}
    assert lines["sequential keep-alive: egress-auth 10k rules >= 97% of mitmdump req/s"]
    assert "### TLS passthrough" in md
    tunnel = "10 MiB download: tunnelled >= 80% of direct throughput"
    assert lines[tunnel]  # 7500 / 9000
    assert math.isclose(summary["newconn"]["eatun"]["rps_vs_intercepted"], 7500 / 990)
    assert "### --workers 2 beside 1 worker" in md
    assert math.isclose(summary["newconn"]["ea10kw2"]["rps_vs_1worker"], 1800 / 980)
