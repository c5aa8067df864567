"""Micro-benchmark of the per-request decision (match + render) at 10 ... 100,000 rules.

Calls the pure core directly, no proxy, no sockets:

* ``decide``: ``policy.match.decide_request`` - pick the first matching credential rule of
  the sandbox, resolve its source, render the header (what the issue calls match + render).
* ``verdict``: ``policy.verdict.verdict`` - the whole per-request decision the proxy's
  ``requestheaders`` hook takes: traffic rules, then ``decide_request``.
* ``facts+verdict``: the addon's own per-request preparation as well (split the target,
  remove dot segments, parse the query, build the lower-cased header map, ``RequestFacts``),
  then ``verdict``.

Two layouts, each at 10, 1,000, 10,000 and 100,000 rules:

* ``one-policy``: every rule in one sandbox's policy (the hardest case for the matcher);
  the three rules on the requested host sit in the middle of the list.
* ``sandboxes``: ten rules per sandbox (``policygen.sandbox_network``) across N/10
  sandboxes; the request uses one of them.

Each number is the median over ``repeats`` runs of ``iterations`` calls, timed with
``time.perf_counter_ns`` with the garbage collector paused (as ``timeit`` does).

Usage::

    python bench/microbench.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import policygen  # noqa: E402

from egress_auth.model.policy import SandboxNetworkPolicy  # noqa: E402
from egress_auth.policy.compile import Snapshot, SourceEntry, compile_policy  # noqa: E402
from egress_auth.policy.match import RequestFacts, decide_request, parse_query  # noqa: E402
from egress_auth.policy.paths import normalize_path, split_target  # noqa: E402
from egress_auth.policy.verdict import verdict  # noqa: E402
from egress_auth.secrets.material import Material, Secret  # noqa: E402

SIZES = (10, 1_000, 10_000, 100_000)
HOST = "echo.bench.test"
PORT = 443
MTLS_PORT = 8443
IP = "127.0.0.1"
TARGET = "/v1/bench"
RAW_HEADERS = [
    ("Host", HOST),
    ("User-Agent", "egress-auth-bench"),
    ("Accept", "*/*"),
    ("Accept-Encoding", "gzip, deflate"),
]


def _entry(name: str, token: str) -> SourceEntry:
    return SourceEntry(name, 1, "static_headers", Material(values={"token": Secret(token)}))


def build(layout: str, n_rules: int) -> tuple[Snapshot, str, float]:
    """(snapshot, the sandbox the request uses, seconds it took to validate and compile)."""
    t0 = time.perf_counter()
    if layout == "one-policy":
        policy = SandboxNetworkPolicy.model_validate(policygen.single_policy(n_rules, HOST, PORT))
        snap = Snapshot(
            policies={"bench": compile_policy(policy)},
            sources={"tok": _entry("tok", "bench-token-one")},
        )
        return snap, "bench", time.perf_counter() - t0
    n_sandboxes = max(1, n_rules // 10)
    policies = {}
    sources = {}
    for i in range(n_sandboxes):
        net = policygen.sandbox_network(i, HOST, PORT, MTLS_PORT, f"tok-{i}", "cert")
        policy = SandboxNetworkPolicy.model_validate({"mode": "allow-all", **net})
        policies[f"sbx-{i}"] = compile_policy(policy)
        sources[f"tok-{i}"] = _entry(f"tok-{i}", f"bench-token-{i}")
    bench = f"sbx-{n_sandboxes // 2}"
    return Snapshot(policies=policies, sources=sources), bench, time.perf_counter() - t0


def _facts() -> RequestFacts:
    raw_path, query = split_target(TARGET)
    headers: dict[str, list[str]] = {}
    for name, value in RAW_HEADERS:
        headers.setdefault(name.lower(), []).append(value)
    return RequestFacts(
        "https", HOST, PORT, "GET", normalize_path(raw_path), parse_query(query), headers
    )


def cases(snap: Snapshot, sandbox: str) -> dict[str, Callable[[], Any]]:
    facts = _facts()
    now = time.time()

    def decide() -> Any:
        return decide_request(snap, sandbox, facts, now)

    def full() -> Any:
        return verdict(snap, sandbox, facts, IP, now, None)

    def with_facts() -> Any:
        raw_path, query = split_target(TARGET)
        headers: dict[str, list[str]] = {}
        for name, value in RAW_HEADERS:
            headers.setdefault(name.lower(), []).append(value)
        f = RequestFacts(
            "https", HOST, PORT, "GET", normalize_path(raw_path), parse_query(query), headers
        )
        return verdict(snap, sandbox, f, IP, now, None)

    return {"decide": decide, "verdict": full, "facts+verdict": with_facts}


def check(snap: Snapshot, sandbox: str) -> str:
    """The benchmark request must be injected by the target's /v1/ rule, or nothing counts."""
    v = verdict(snap, sandbox, _facts(), IP, time.time(), None)
    assert v.decision == "injected", v
    assert v.resolution is not None and v.resolution.rule.startswith("v1-"), v.resolution
    assert [n for n, _ in v.headers] == ["Authorization"]
    assert v.headers[0][1].reveal().startswith("Bearer bench-token-")
    return v.resolution.rule


def time_ns(fn: Callable[[], Any], iterations: int, repeats: int) -> dict[str, float]:
    """Median and min ns per call over `repeats` timed loops of `iterations` calls."""
    for _ in itertools.repeat(None, min(iterations, 1000)):  # warm caches
        fn()
    per_call = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for _ in itertools.repeat(None, iterations):
                fn()
            per_call.append((time.perf_counter_ns() - t0) / iterations)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"median_ns": statistics.median(per_call), "min_ns": min(per_call)}


def run(
    sizes: tuple[int, ...] = SIZES,
    iterations: int = 20_000,
    repeats: int = 9,
    layouts: tuple[str, ...] = ("one-policy", "sandboxes"),
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    baseline = time_ns(lambda: None, iterations, repeats)["median_ns"]
    for layout in layouts:
        for n in sizes:
            snap, sandbox, build_s = build(layout, n)
            rule = check(snap, sandbox)
            row: dict[str, Any] = {
                "layout": layout,
                "rules": n,
                "sandboxes": len(snap.policies),
                "matched_rule": rule,
                "build_s": build_s,
            }
            for name, fn in cases(snap, sandbox).items():
                row[name] = time_ns(fn, iterations, repeats)
            results.append(row)
            del snap
            gc.collect()
    return {
        "python": platform.python_version(),
        "iterations": iterations,
        "repeats": repeats,
        "call_overhead_ns": baseline,
        "affinity": sorted(os.sched_getaffinity(0)),
        "rows": results,
        "budget": budget(results),
    }


def budget(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """< 10 us per request; growth from the smallest to the largest size < 20%."""
    out: dict[str, Any] = {}
    for layout in sorted({r["layout"] for r in rows}):
        mine = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["rules"])
        for metric in ("decide", "verdict", "facts+verdict"):
            worst = max(r[metric]["median_ns"] for r in mine)
            growth = mine[-1][metric]["median_ns"] / mine[0][metric]["median_ns"] - 1
            out[f"{layout}/{metric}"] = {
                "max_us": worst / 1000,
                "under_10us": worst < 10_000,
                "growth": growth,
                "growth_under_20pct": growth < 0.20,
                "from_rules": mine[0]["rules"],
                "to_rules": mine[-1]["rules"],
            }
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| layout | rules | sandboxes | decide (match + render) | verdict | facts + verdict"
        " | build |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['layout']} | {r['rules']:,} | {r['sandboxes']:,} "
            f"| {r['decide']['median_ns'] / 1000:.2f} µs "
            f"| {r['verdict']['median_ns'] / 1000:.2f} µs "
            f"| {r['facts+verdict']['median_ns'] / 1000:.2f} µs | {r['build_s']:.2f} s |"
        )
    lines.append("")
    lines.append(
        f"Median of {res['repeats']} runs of {res['iterations']:,} calls each; an empty call "
        f"costs {res['call_overhead_ns']:.0f} ns of that (not subtracted)."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="per-request decision micro-benchmark")
    p.add_argument("--quick", action="store_true", help="fewer iterations (about 20 s)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    args = p.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    res = run(sizes, iterations=3_000, repeats=5) if args.quick else run(sizes)
    print(markdown(res))
    for key, b in res["budget"].items():
        print(
            f"{key}: max {b['max_us']:.2f} us ({'ok' if b['under_10us'] else 'OVER'} 10 us), "
            f"growth {b['growth'] * 100:+.1f}% from {b['from_rules']:,} to {b['to_rules']:,} "
            f"rules ({'ok' if b['growth_under_20pct'] else 'OVER'} 20%)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
