"""`run --workers N`: the N-1 extra proxy processes, seen from the process that owns the store.

The first process does everything it does with one worker (proxy, admin API, store, expiry
timer) and also starts N-1 proxy-only processes (`egress_auth.worker`) that listen on the same
port with SO_REUSEPORT, so the kernel spreads connections over all N.

Each extra process gets a control socket (a socketpair; JSON lines):

    worker -> here   {"op": "ready"} | {"op": "failed", "reason": ...}
    here -> worker   {"op": "sync", "seq": n}       re-read the store, then answer
    worker -> here   {"op": "synced", "seq": n}
    here -> worker   {"op": "counters", "seq": n}   its metrics counters, for /metrics
    worker -> here   {"op": "counters", "seq": n, "counters": [...]}
    here -> worker   {"op": "ping"}                 every PING_INTERVAL seconds
    worker -> here   {"op": "pong"}

Every snapshot swap here (an admin API write, an expiry purge, a SIGHUP reload) sends one
`sync`. The admin API answers a write only after every ready worker acknowledged the sync that
followed it (`barrier`), so a client that got its answer finds the change in whichever process
the kernel hands its next connection to. No secret crosses the socket: a worker reads the
store, with the master key, itself.

A worker that exits unexpectedly is started again (at most `MAX_RESTARTS` times within
`RESTART_WINDOW` seconds); its socket's EOF is how this side notices. A worker that sends
nothing for `EGRESS_AUTH_WORKER_TIMEOUT` seconds (hung: it would still hold its share of the
port) is killed, which then starts it again. When this process dies,
the workers see EOF on their end and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .metrics import Counters

log = logging.getLogger("egress_auth")

START_TIMEOUT = 120.0  # a 10,000-rule config file takes seconds to parse
SYNC_TIMEOUT = 1.0  # the budget for a write to reach every worker
COUNTERS_TIMEOUT = 1.0
STOP_TIMEOUT = 5.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
MAX_LINE = 16 * 1024 * 1024  # a counters answer grows with the number of rules
PING_INTERVAL = 2.0
# A worker silent for this long (hung, not exited: it would keep its share of the port and
# leave the connections the kernel hands it waiting) is killed, and so started again.
SILENCE_ENV = "EGRESS_AUTH_WORKER_TIMEOUT"
DEFAULT_SILENCE = 15.0


class WorkerError(Exception):
    """A one-line reason the extra proxy processes could not start."""


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    acked: int = 0
    alive: bool = True
    heard: float = field(default_factory=time.monotonic)  # when it last sent anything
    reader_task: asyncio.Task[None] | None = None
    answers: dict[int, asyncio.Future[Counters]] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        """Started, said ready, and not gone since."""
        return self.alive and _done_ok(self.ready)

    def send(self, message: dict[str, Any]) -> None:
        if self.alive and not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


class WorkerPool:
    def __init__(self, count: int, spec: dict[str, Any]) -> None:
        self.count = count
        self.spec = spec
        self.workers: dict[int, Worker] = {}
        self.seq = 0  # the latest sync sent
        self._asked = 0  # the latest counters request
        self._acks = asyncio.Event()
        self._stopping = False
        self._restarts: dict[int, deque[float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.silence = silence_limit()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each listens; raise WorkerError if one cannot."""
        for i in range(1, self.count + 1):
            self.workers[i] = await self._spawn(i)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready for w in self.workers.values())), START_TIMEOUT
            )
        except TimeoutError:
            raise WorkerError(
                f"a proxy worker did not start listening within {START_TIMEOUT:.0f}s"
            ) from None
        self._spawn_task(self._watch())

    async def _spawn(self, index: int) -> Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "egress_auth.worker",
                str(theirs.fileno()),
                json.dumps({**self.spec, "index": index}),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)
        w = Worker(index, proc, writer, asyncio.get_running_loop().create_future())
        w.reader_task = asyncio.create_task(self._read(w, reader))
        return w

    async def stop(self) -> None:
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        workers = list(self.workers.values())
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                await asyncio.wait_for(w.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            w.writer.close()
            if w.reader_task is not None:
                w.reader_task.cancel()

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.serving)

    # ---- control messages -------------------------------------------------------------------

    async def _read(self, w: Worker, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):
                line = b""
            if not line:
                break
            w.heard = time.monotonic()
            try:
                msg = json.loads(line)
                op = msg["op"]
            except (ValueError, KeyError, TypeError):
                log.error("worker %d sent an unreadable control message", w.index)
                continue
            if op == "ready" and not w.ready.done():
                w.ready.set_result(None)
            elif op == "failed" and not w.ready.done():
                reason = str(msg.get("reason", "unknown"))
                w.ready.set_exception(WorkerError(f"proxy worker {w.index}: {reason}"))
            elif op == "synced":
                w.acked = max(w.acked, int(msg["seq"]))
                self._acks.set()
            elif op == "counters":
                fut = w.answers.pop(int(msg["seq"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("counters", []))
        await self._lost(w)

    async def _lost(self, w: Worker) -> None:
        w.alive = False
        self._acks.set()  # a barrier waiting on it must not wait for the timeout
        code = await w.proc.wait()
        if not w.ready.done():
            w.ready.set_exception(
                WorkerError(f"proxy worker {w.index} exited with status {code} during start-up")
            )
            return
        if self._stopping:
            return
        recent = self._restarts.setdefault(w.index, deque())
        now = time.monotonic()
        while recent and now - recent[0] > RESTART_WINDOW:
            recent.popleft()
        if len(recent) >= MAX_RESTARTS:
            log.error(
                "proxy worker %d exited with status %s; restarted %d times in %.0fs, giving up",
                w.index,
                code,
                len(recent),
                RESTART_WINDOW,
            )
            return
        recent.append(now)
        log.error("proxy worker %d exited with status %s; starting it again", w.index, code)
        self._spawn_task(self._restart(w.index))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        """Ping every ready worker; kill one that has been silent for `silence` seconds."""
        while not self._stopping:
            now = time.monotonic()
            for w in list(self.workers.values()):
                if not w.serving:
                    continue
                if now - w.heard > self.silence:
                    log.error(
                        "proxy worker %d did not answer for %.0fs; killing it",
                        w.index,
                        now - w.heard,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()  # its EOF then restarts it
                    w.heard = now  # once
                else:
                    w.send({"op": "ping"})
            await asyncio.sleep(PING_INTERVAL)

    async def _restart(self, index: int) -> None:
        await asyncio.sleep(1.0)
        if self._stopping:
            return
        w = await self._spawn(index)
        self.workers[index] = w
        try:
            await asyncio.wait_for(asyncio.shield(w.ready), START_TIMEOUT)
        except (TimeoutError, WorkerError) as e:
            log.error("proxy worker %d did not start again: %s", index, e)
            return
        # It read the store while starting; a sync makes sure nothing since was missed.
        self.on_swap(None)

    # ---- changes ----------------------------------------------------------------------------

    def on_swap(self, _snapshot: object) -> None:
        """A LiveState listener: the store or config changed here; tell every worker."""
        self.seq += 1
        for w in self.workers.values():
            w.send({"op": "sync", "seq": self.seq})

    async def barrier(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Wait until every ready worker applied the latest sync; False on timeout."""
        target = self.seq
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            behind = [w.index for w in self.workers.values() if w.serving and w.acked < target]
            if not behind:
                return True
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning(
                    "proxy workers %s did not apply change %d within %.1fs",
                    behind,
                    target,
                    timeout,
                )
                return False
            self._acks.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.wait(), remaining)

    def forward_sighup(self) -> None:
        for w in self.workers.values():
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)

    async def counters(self) -> list[Counters]:
        """Every ready worker's metrics counters (a worker that does not answer is left out)."""
        self._asked += 1
        seq = self._asked
        waiting = []
        loop = asyncio.get_running_loop()
        for w in self.workers.values():
            if w.serving:
                fut: asyncio.Future[Counters] = loop.create_future()
                w.answers[seq] = fut
                w.send({"op": "counters", "seq": seq})
                waiting.append(fut)
        if not waiting:
            return []
        done, pending = await asyncio.wait(waiting, timeout=COUNTERS_TIMEOUT)
        for fut in pending:
            fut.cancel()
        return [f.result() for f in done if not f.cancelled()]


def silence_limit() -> float:
    raw = os.environ.get(SILENCE_ENV)
    try:
        value = float(raw) if raw else DEFAULT_SILENCE
    except ValueError:
        log.warning(
            "%s=%r is not a number of seconds; using %.0f", SILENCE_ENV, raw, DEFAULT_SILENCE
        )
        value = DEFAULT_SILENCE
    # Below a few ping intervals a busy but healthy worker would be killed.
    return max(value, 3 * PING_INTERVAL)


def _done_ok(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None
