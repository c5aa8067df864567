"""HTTP/1.1-over-TLS load generator for the benchmark (one run per process).

Bare ``asyncio.Protocol`` callbacks (uvloop when installed): on keep-alive connections the
next request is written from inside the callback that completed the previous response, so
the per-request cost is a few microseconds of Python. Through a proxy it sends ``CONNECT``
(with ``Proxy-Authorization`` when given), then upgrades the same socket to TLS.

Modes:

* ``keepalive``: ``concurrency`` connections, each sending requests back to back.
* ``newconn``: ``concurrency`` workers; each request opens a new TCP connection (and
  CONNECT, and TLS handshake), sends one request, reads the answer and closes.

A run has a warm-up, then a measured window: only requests that complete inside the window
count, and the CPU time of the watched processes (the proxy, the upstream, this process) is
read from ``/proc/PID/stat`` at the window's edges. Every loop is bounded by the deadline
and by ``max_requests``.

Usage (run.py does this)::

    python bench/loadgen.py '<json spec>'    # prints one JSON result line
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_RESPONSE = 1 << 20


def cpu_seconds(pids: int | list[int]) -> float:
    """utime + stime of whole processes (all their threads), in seconds, summed."""
    total = 0
    for pid in pids if isinstance(pids, list) else [pids]:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


@dataclass
class Spec:
    target_host: str
    target_port: int
    mode: str  # keepalive | newconn
    concurrency: int
    warmup_s: float
    duration_s: float
    cafile: str
    proxy_host: str | None = None
    proxy_port: int | None = None
    proxy_auth: str | None = None  # "id:token"
    client_cert: str | None = None  # chain file
    client_key: str | None = None
    path: str = "/v1/bench"
    max_requests: int = 5_000_000
    watch: dict[str, int | list[int]] = field(default_factory=dict)  # name -> pid(s)


@dataclass
class Stats:
    warm_end: int
    end: int
    max_requests: int
    latencies: list[int] = field(default_factory=list)  # ns, measured window only
    completed: int = 0  # all requests, warm-up included
    body_bytes: int = 0  # body bytes of those
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    auth_true: int = 0
    cert_true: int = 0
    stop: bool = False

    def record(self, started: int, now: int, status: int, auth: bool, cert: bool) -> None:
        self.completed += 1
        if self.warm_end <= now <= self.end:
            if status == 200:
                self.latencies.append(now - started)
                self.auth_true += auth
                self.cert_true += cert
            else:
                self.error(f"status {status}")
        if now >= self.end or self.completed >= self.max_requests:
            self.stop = True

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class Conn(asyncio.Protocol):
    """One client connection: CONNECT phase (through a proxy), then HTTP/1.1 responses."""

    def __init__(self, stats: Stats, request: bytes, keepalive: bool) -> None:
        self.stats = stats
        self.request = request
        self.keepalive = keepalive
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connecting = False
        self.connect_fut: asyncio.Future[int] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at = 0
        self.head = b""
        self.body_left = 0
        self.bytes_in = 0  # response body bytes, warm-up included

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.body_left:
            # Inside a body: count its bytes, keep none (a download is megabytes).
            n = min(len(data), self.body_left)
            self.body_left -= n
            self.bytes_in += n
            if self.body_left:
                return
            self._complete()
            data = data[n:]
            if not data:
                return
        self.buf += data
        if self.connecting:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0 and self.connect_fut is not None and not self.connect_fut.done():
                status = int(self.buf[9:12]) if self.buf[:5] == b"HTTP/" else 0
                del self.buf[: end + 4]
                self.connect_fut.set_result(status)
            return
        while not self.done.done() and not self.body_left:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_RESPONSE:
                    self._fail("response head too large")
                return
            head = bytes(self.buf[:end]).lower()
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self._fail("no content-length")
                return
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            self.head = head
            have = min(len(self.buf) - end - 4, length)
            del self.buf[: end + 4 + have]
            self.bytes_in += have
            self.body_left = length - have
            if not self.body_left:
                self._complete()

    def _complete(self) -> None:
        """One whole response arrived: record it, then send the next or finish."""
        head = self.head
        stats = self.stats
        stats.body_bytes += self.bytes_in
        self.bytes_in = 0
        stats.record(
            self.sent_at,
            time.perf_counter_ns(),
            int(head[9:12]),
            b"\r\nx-bench-auth: true" in head,
            b"\r\nx-bench-cert: true" in head,
        )
        if self.keepalive and not stats.stop and b"\r\nconnection: close" not in head:
            self.send()
        else:
            self.done.set_result(None)

    def _fail(self, kind: str) -> None:
        self.stats.error(kind)
        if not self.done.done():
            self.done.set_exception(ConnectionError(kind))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connect_fut is not None and not self.connect_fut.done():
            self.connect_fut.set_exception(ConnectionError("closed during CONNECT"))
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc!r}"))


class Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        ctx = ssl.create_default_context(cafile=spec.cafile)
        if spec.client_cert:
            ctx.load_cert_chain(spec.client_cert, spec.client_key)
        self.ctx = ctx
        authority = f"{spec.target_host}:{spec.target_port}"
        self.request = (
            f"GET {spec.path} HTTP/1.1\r\nHost: {authority}\r\n"
            "User-Agent: egress-auth-bench\r\nAccept: */*\r\n\r\n"
        ).encode()
        connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if spec.proxy_auth:
            token = base64.b64encode(spec.proxy_auth.encode()).decode()
            connect += f"Proxy-Authorization: Basic {token}\r\n"
        self.connect = (connect + "\r\n").encode()

    async def open(self, stats: Stats, keepalive: bool) -> Conn:
        spec = self.spec
        loop = asyncio.get_running_loop()
        if spec.proxy_host is None:
            _, conn = await loop.create_connection(
                lambda: Conn(stats, self.request, keepalive),
                spec.target_host,
                spec.target_port,
                ssl=self.ctx,
                server_hostname=spec.target_host,
            )
            return conn
        transport, conn = await loop.create_connection(
            lambda: Conn(stats, self.request, keepalive), spec.proxy_host, spec.proxy_port
        )
        conn.connecting = True
        conn.connect_fut = loop.create_future()
        transport.write(self.connect)
        status = await conn.connect_fut
        if status != 200:
            transport.close()
            raise ConnectionError(f"CONNECT answered {status}")
        conn.connecting = False
        tls = await loop.start_tls(transport, conn, self.ctx, server_hostname=spec.target_host)
        conn.transport = tls  # type: ignore[assignment]
        return conn

    async def keepalive_worker(self, stats: Stats) -> None:
        attempts = 0
        while not stats.stop and attempts < 100:
            attempts += 1
            try:
                conn = await self.open(stats, keepalive=True)
                conn.send()
                await conn.done
                if conn.transport is not None:
                    conn.transport.close()
            except (OSError, ssl.SSLError, ConnectionError, ValueError) as e:
                stats.error(type(e).__name__)
                await asyncio.sleep(0.01)

    async def newconn_worker(self, stats: Stats) -> None:
        while not stats.stop:
            started = time.perf_counter_ns()
            try:
                conn = await self.open(stats, keepalive=False)
                conn.send()
                conn.sent_at = started  # latency includes connect, CONNECT and handshakes
                await conn.done
                if conn.transport is not None:
                    conn.transport.close()
            except (OSError, ssl.SSLError, ConnectionError, ValueError) as e:
                stats.error(type(e).__name__)
                await asyncio.sleep(0.01)

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        warm_end = t0 + int(spec.warmup_s * 1e9)
        end = warm_end + int(spec.duration_s * 1e9)
        stats = Stats(warm_end, end, spec.max_requests)
        pids: dict[str, int | list[int]] = {**spec.watch, "loadgen": os.getpid()}
        cpu: dict[str, dict[str, float]] = {"start": {}, "end": {}}

        def snap(which: str) -> None:
            cpu[which]["_wall"] = time.perf_counter_ns() / 1e9
            cpu[which]["_completed"] = stats.completed
            for name, pid in pids.items():
                try:
                    cpu[which][name] = cpu_seconds(pid)
                except OSError:
                    cpu[which][name] = float("nan")

        loop.call_at(loop.time() + spec.warmup_s, snap, "start")
        loop.call_at(loop.time() + spec.warmup_s + spec.duration_s, snap, "end")
        worker = self.keepalive_worker if spec.mode == "keepalive" else self.newconn_worker
        tasks = [asyncio.ensure_future(worker(stats)) for _ in range(spec.concurrency)]
        # Bounded: the window, plus grace for requests in flight at its end.
        _, pending = await asyncio.wait(tasks, timeout=spec.warmup_s + spec.duration_s + 15)
        stats.stop = True
        for t in pending:
            t.cancel()
        if "end" not in cpu or "_wall" not in cpu["end"]:
            snap("end")
        cpu_window = cpu["end"]["_wall"] - cpu["start"]["_wall"]
        lat = sorted(stats.latencies)
        n = len(lat)
        cpu_delta = {
            name: cpu["end"][name] - cpu["start"][name] for name in pids if name in cpu["start"]
        }
        return {
            "requests": n,
            "window_s": spec.duration_s,
            "cpu_window_s": cpu_window,
            "rps": n / spec.duration_s,
            "p50_ms": percentile(lat, 0.50) / 1e6,
            "p95_ms": percentile(lat, 0.95) / 1e6,
            "p99_ms": percentile(lat, 0.99) / 1e6,
            "mean_ms": (sum(lat) / n / 1e6) if n else float("nan"),
            "max_ms": (lat[-1] / 1e6) if n else float("nan"),
            "completed": stats.completed,
            "body_bytes": stats.body_bytes,
            "errors": stats.errors,
            "error_kinds": stats.error_kinds,
            "auth_true": stats.auth_true,
            "cert_true": stats.cert_true,
            "cpu_s": cpu_delta,
            "loop": type(loop).__module__.split(".")[0],
            "affinity": sorted(os.sched_getaffinity(0)),
        }


def run_spec(spec: Spec, use_uvloop: bool = True) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return await Generator(spec).run()

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main())  # type: ignore[no-any-return]
    return asyncio.run(main())


def main() -> None:
    raw = json.loads(sys.argv[1])
    use_uvloop = raw.pop("uvloop", True)
    result = run_spec(Spec(**raw), use_uvloop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
