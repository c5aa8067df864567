"""One extra proxy process of `run --workers N` (started by `workers.WorkerPool`, not by hand).

    python -m egress_auth.worker CONTROL_FD SPEC_JSON

It builds the same proxy as the first process (`app.build_proxy`), listening on the same port
with SO_REUSEPORT; reads the config file and the store (read-only, with the master key) itself;
and follows the first process's control socket: `sync` re-reads the store, `counters` answers
with its metrics. EOF on that socket means the first process is gone, and this one stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from . import audit
from .app import RunSettings, build_proxy, release_freed_memory
from .config import ConfigError, load_config
from .metrics import METRICS
from .model.config import ConfigFile
from .secrets.crypto import MasterKeyError, load_master_key
from .secrets.store import Store, StoreError
from .stored import StoredState
from .workers import MAX_LINE

READY_TIMEOUT = 30.0


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def _listening(master: Any, run: asyncio.Task[None]) -> str | None:
    """Wait until mitmproxy's listener runs; the reason it failed, or None."""
    proxyserver = master.addons.get("proxyserver")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while loop.time() < deadline:
        if run.done():
            return "stopped before it listened"
        servers = list(proxyserver.servers)
        failed = [s.last_exception for s in servers if s.last_exception is not None]
        if failed:
            return str(failed[0])
        if servers and all(s.is_running for s in servers) and not proxyserver.servers.is_updating:
            return None
        await asyncio.sleep(0.02)
    return f"not listening after {READY_TIMEOUT:.0f}s"


async def serve(spec: dict[str, Any], config: ConfigFile, store: Store, ctl: socket.socket) -> None:
    index = int(spec["index"])
    audit.STATIC["worker"] = index
    host, port = spec["listen"]
    settings = RunSettings(
        config=config,
        config_path=Path(spec["config"]) if spec["config"] else None,
        listen=(str(host), int(port)),
        admin_listen=("", 0),  # no admin API here
        certs_dir=Path(spec["certs_dir"]),
        data_dir=Path(spec["data_dir"]),
        upstream_ca=None,
        workers=int(spec["workers"]),
    )
    master, addon = build_proxy(settings, spec["trust"])
    stored = StoredState(store, addon.state)
    stored.load()
    release_freed_memory()
    reader, writer = await asyncio.open_unix_connection(sock=ctl, limit=MAX_LINE)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()  # master.run() clears its own flag when it starts: keep ours
        master.shutdown()  # type: ignore[no-untyped-call]

    loop.add_signal_handler(signal.SIGTERM, stop)
    run = asyncio.create_task(master.run())
    failed = await _listening(master, run)
    if stopping.is_set():
        master.shutdown()  # type: ignore[no-untyped-call]
        await run
        return
    if failed is not None:
        _send(writer, {"op": "failed", "reason": failed})
        await writer.drain()
        master.shutdown()  # type: ignore[no-untyped-call]
        await run
        raise SystemExit(1)
    _send(writer, {"op": "ready"})
    follow = asyncio.create_task(_follow(reader, writer, stored))
    await asyncio.wait([run, follow], return_when=asyncio.FIRST_COMPLETED)
    if not run.done():  # the first process is gone
        master.shutdown()  # type: ignore[no-untyped-call]
        await run
    follow.cancel()
    store.close()


async def _follow(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stored: StoredState
) -> None:
    while line := await reader.readline():
        msg = json.loads(line)
        if msg["op"] == "sync":
            stored.load()
            _send(writer, {"op": "synced", "seq": msg["seq"]})
        elif msg["op"] == "ping":
            _send(writer, {"op": "pong"})
        elif msg["op"] == "counters":
            _send(writer, {"op": "counters", "seq": msg["seq"], "counters": METRICS.export()})
        await writer.drain()


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the first process decides when
    # the workers stop (SIGTERM), so that shutdown happens once and in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(argv[1]))
    spec = json.loads(argv[2])
    prefix = f"egress-auth worker {spec.get('index')}:"
    try:
        config = load_config(Path(spec["config"])).config if spec["config"] else ConfigFile()
        data_dir = Path(spec["data_dir"])
        store = Store.open(data_dir, load_master_key(data_dir, store_exists=True), readonly=True)
    except (ConfigError, MasterKeyError, StoreError) as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(spec, config, store, ctl))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
