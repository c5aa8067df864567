"""Builds and runs the proxy process: a mitmproxy DumpMaster with the egress-auth addon."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import certifi

from .model.config import ConfigFile, split_host_port
from .proxy.addon import EgressAuth

# Bodies larger than this are streamed through instead of buffered: injection happens in
# `requestheaders`, before the body, so streamed uploads get their credential too.
STREAM_LARGE_BODIES = "1m"


class StartupError(Exception):
    """A one-line reason the process cannot start."""


@dataclass
class RunSettings:
    config: ConfigFile
    config_path: Path | None
    listen: tuple[str, int]
    certs_dir: Path
    data_dir: Path
    upstream_ca: Path | None


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


def check_port_free(host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"{what} address {host}:{port} is already in use") from None
            raise StartupError(
                f"cannot listen on {what} address {host}:{port}: {e.strerror}"
            ) from None


async def _run(settings: RunSettings, announce: list[str]) -> None:
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    host, port = settings.listen
    opts = options.Options(
        listen_host=host,
        listen_port=port,
        confdir=str(settings.certs_dir),
    )
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    # This option belongs to an addon, so it exists only once the master has loaded them.
    opts.update(stream_large_bodies=STREAM_LARGE_BODIES)  # type: ignore[no-untyped-call]
    trust = upstream_trust_bundle(settings.data_dir, settings.upstream_ca)
    if trust:
        opts.update(ssl_verify_upstream_trusted_ca=trust)  # type: ignore[no-untyped-call]
    addon = EgressAuth(config=settings.config, config_path=settings.config_path)
    master.addons.add(addon)  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    for line in announce:
        print(line, flush=True)
    await master.run()


def check_sandbox_auth(config: ConfigFile, host: str) -> None:
    """Refuse to serve other machines' clients until they can be told apart.

    The spec's default is `sandboxAuth: required` on a non-loopback address, and per-sandbox
    identity is not built yet: starting anyway would hand the credentials to anyone who can
    reach the port. Saying `sandboxAuth: optional` accepts that on purpose.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and config.proxy.sandbox_auth != "optional":
        raise StartupError(
            f"listening on {host} (not loopback) needs sandboxAuth: required, and per-sandbox "
            "identity is not implemented yet; set proxy.sandboxAuth: optional to accept every "
            "client as the sandbox 'default'"
        )


def run(settings: RunSettings) -> None:
    host, port = settings.listen
    check_sandbox_auth(settings.config, host)
    check_port_free(host, port, "proxy")
    ca = ensure_ca(settings.certs_dir)
    shown_host = f"[{host}]" if ":" in host else host
    announce = [
        f"egress-auth proxy: http://{shown_host}:{port}",
        "egress-auth admin: not served yet (the admin API is planned)",
        f"egress-auth CA: {ca.resolve()}",
    ]
    asyncio.run(_run(settings, announce))


def listen_of(value: str) -> tuple[str, int]:
    return split_host_port(value)
