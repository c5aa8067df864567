"""Builds and runs the proxy process: a mitmproxy DumpMaster with the egress-auth addon."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import certifi

from . import audit
from .admin.api import create_app
from .admin.auth import TOKEN_ENV as ADMIN_TOKEN_ENV
from .admin.auth import AdminTokenError, load_admin_token
from .admin.policy_service import PolicyService
from .admin.server import bind, make_server
from .admin.service import SourceService
from .metrics import METRICS
from .model.config import ConfigFile, split_host_port
from .proxy import listener
from .proxy.addon import EgressAuth
from .proxy.conn import is_loopback
from .proxy.master import ProxyMaster
from .secrets.crypto import MasterKeyError, load_master_key
from .secrets.store import Store, StoreError
from .workers import WorkerError, WorkerPool

# Bodies larger than this are streamed through instead of buffered: injection happens in
# `requestheaders`, before the body, so streamed uploads get their credential too.
STREAM_LARGE_BODIES = "1m"


log = logging.getLogger("egress_auth")


class StartupError(Exception):
    """A one-line reason the process cannot start."""


@dataclass
class RunSettings:
    config: ConfigFile
    config_path: Path | None
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    certs_dir: Path
    data_dir: Path
    upstream_ca: Path | None
    workers: int = 1


@dataclass
class Resources:
    """What start-up acquired before the loop runs; each step fails with a one-line reason."""

    store: Store
    admin_socket: socket.socket
    admin_token: str
    lock: IO[bytes]


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """One process owns a data dir: a second proxy, or a rekey, would race its writes."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = (data_dir / "lock").open("ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StartupError(
            f"another egress-auth process is using the data dir {data_dir}"
        ) from None
    return f


def open_store(data_dir: Path) -> Store:
    try:
        key = load_master_key(data_dir, store_exists=Store.exists(data_dir))
        return Store.open(data_dir, key)
    except (MasterKeyError, StoreError) as e:
        raise StartupError(str(e)) from None


def ensure_ca(certs_dir: Path) -> Path:
    """Create mitmproxy's CA in `certs_dir` if missing; return the CA certificate's path."""
    from mitmproxy.certs import CertStore

    certs_dir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(certs_dir, "mitmproxy", 2048)
    return certs_dir / "mitmproxy-ca-cert.pem"


def upstream_trust_bundle(data_dir: Path, extra: Path | None) -> str | None:
    """The default roots plus `upstreamCaFile`, as one file mitmproxy can load.

    mitmproxy's own option replaces the default roots; the spec says "beside the defaults".
    The bundle holds only public certificates.
    """
    if extra is None:
        return None
    try:
        extra_pem = extra.read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read upstreamCaFile {str(extra)!r}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in extra_pem:
        raise StartupError(f"upstreamCaFile {str(extra)!r} holds no PEM certificate")
    data_dir.mkdir(parents=True, exist_ok=True)
    bundle = data_dir / "upstream-ca-bundle.pem"
    tmp = bundle.with_suffix(".tmp")
    tmp.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + extra_pem)
    os.replace(tmp, bundle)
    return str(bundle)


def bind_or_fail(host: str, port: int, what: str) -> socket.socket:
    """Bind now, so a taken port is a one-line reason instead of a traceback later."""
    try:
        return bind(host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"{what} address {host}:{port} is already in use") from None
        raise StartupError(f"cannot listen on {what} address {host}:{port}: {e.strerror}") from None


def build_proxy(settings: RunSettings, trust: str | None) -> tuple[ProxyMaster, EgressAuth]:
    """The mitmproxy master and the egress-auth addon, as every proxy process runs them."""
    from mitmproxy import options

    host, port = settings.listen
    opts = options.Options(
        listen_host=host,
        listen_port=port,
        confdir=str(settings.certs_dir),
    )
    master = ProxyMaster(opts)
    # This option belongs to an addon, so it exists only once the master has loaded them.
    opts.update(stream_large_bodies=STREAM_LARGE_BODIES)  # type: ignore[no-untyped-call]
    if trust:
        opts.update(ssl_verify_upstream_trusted_ca=trust)  # type: ignore[no-untyped-call]
    addon = EgressAuth(
        config=settings.config, config_path=settings.config_path, loopback=is_loopback(host)
    )
    master.addons.add(addon)  # type: ignore[no-untyped-call]
    try:
        listener.install(addon, reuse_port=settings.workers > 1)
    except listener.ListenerUnsupported as e:
        if settings.workers > 1:  # `run` checked this before starting anything
            raise StartupError(str(e)) from None
        log.warning("%s: tunnels are relayed by mitmproxy itself", e)
    return master, addon


async def _run(settings: RunSettings, res: Resources, announce: list[str]) -> None:
    trust = upstream_trust_bundle(settings.data_dir, settings.upstream_ca)
    master, addon = build_proxy(settings, trust)
    service = SourceService(res.store, addon.state)
    service.load()
    service.schedule_expiry()
    METRICS.gauges["egress_auth_policy_snapshot_generation"] = lambda: float(
        addon.state.snapshot.generation
    )
    ca_path = settings.certs_dir / "mitmproxy-ca-cert.pem"
    policy = PolicyService(res.store, addon.state, settings.listen, addon.dial_ip)
    policy.load()
    release_freed_memory()
    pool = None
    if settings.workers > 1:
        audit.STATIC["worker"] = 0
        pool = WorkerPool(settings.workers - 1, worker_spec(settings, trust))
        # Every change this process makes (API write, expiry, SIGHUP) reaches the others.
        addon.state.listeners.append(pool.on_swap)
        addon.on_reload.append(pool.forward_sighup)
        METRICS.gauges["egress_auth_proxy_workers_ready"] = lambda: float(1 + pool.ready_count)
    app = create_app(
        service,
        res.admin_token,
        ca_path.read_bytes,
        policy,
        sync=pool.barrier if pool else None,
        other_metrics=pool.counters if pool else None,
    )
    admin = make_server(app)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        # master.run() starts by clearing its exit flag: a signal that arrives before it runs
        # (while workers start) is remembered here instead.
        stopping.set()
        admin.should_exit = True
        master.shutdown()  # type: ignore[no-untyped-call]

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        if pool is not None:
            try:
                await pool.start()
            except WorkerError as e:
                raise StartupError(str(e)) from None
            announce.insert(1, f"egress-auth workers: {settings.workers} proxy processes")
        if stopping.is_set():
            return
        admin_task = asyncio.create_task(admin.serve(sockets=[res.admin_socket]))
        for line in announce:
            print(line, flush=True)
        try:
            await master.run()
        finally:
            admin.should_exit = True
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(admin_task, 5)
    finally:
        if pool is not None:
            await pool.stop()


def release_freed_memory() -> None:
    """Hand the heap that start-up freed back to the OS (glibc keeps it otherwise).

    Compiling thousands of sandboxes' policies frees megabytes of temporaries; without this
    they stay in the process's RSS for its whole life. A no-op where there is no glibc.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker_spec(settings: RunSettings, trust: str | None) -> dict[str, object]:
    """What an extra proxy process needs to build the same proxy (no secrets: it reads the
    key and the store itself, as this process did)."""
    return {
        "config": str(settings.config_path) if settings.config_path else None,
        "listen": list(settings.listen),
        "certs_dir": str(settings.certs_dir),
        "data_dir": str(settings.data_dir),
        "trust": trust,
        "workers": settings.workers,
    }


def run(settings: RunSettings) -> None:
    host, port = settings.listen
    if settings.workers > 1:
        try:
            listener.check()
        except listener.ListenerUnsupported as e:
            raise StartupError(str(e)) from None
    # mitmproxy binds the proxy port itself: only check that it is free.
    bind_or_fail(host, port, "proxy").close()
    a_host, a_port = settings.admin_listen
    admin_socket = bind_or_fail(a_host, a_port, "admin")
    lock = lock_data_dir(settings.data_dir)
    store = open_store(settings.data_dir)
    try:
        token = load_admin_token(settings.data_dir)
    except AdminTokenError as e:
        raise StartupError(str(e)) from None
    ca = ensure_ca(settings.certs_dir)
    announce = [
        f"egress-auth proxy: http://{_show(host)}:{port}",
        f"egress-auth admin: http://{_show(a_host)}:{a_port}",
        f"egress-auth CA: {ca.resolve()}",
    ]
    if not os.environ.get(ADMIN_TOKEN_ENV):
        announce.append(
            f"egress-auth admin token: in {(settings.data_dir / 'admin-token').resolve()}"
        )
    resources = Resources(store, admin_socket, token, lock)
    try:
        asyncio.run(_run(settings, resources, announce))
    finally:
        store.close()
        lock.close()


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_of(value: str) -> tuple[str, int]:
    return split_host_port(value)
