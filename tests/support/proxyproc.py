"""Run the real `egress-auth run` process for end-to-end tests and collect what it prints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from .upstreams import wait_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """`egress-auth run` in a subprocess, stdout and stderr captured to files."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        certs_dir: Path | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        config = json.loads(json.dumps(config))
        config.setdefault("proxy", {})["listen"] = f"127.0.0.1:{self.port}"
        config.setdefault("admin", {})["listen"] = f"127.0.0.1:{self.admin_port}"
        self.config_path = workdir / "egress-auth.yaml"
        self.write_config(config)
        self.certs_dir = certs_dir or workdir / "certs"
        self.data_dir = workdir / "data"
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.admin_token = "test-admin-token-" + os.urandom(8).hex()
        self.env = {**os.environ, "EGRESS_AUTH_ADMIN_TOKEN": self.admin_token, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.args = list(args or [])

    def write_config(self, config: dict[str, Any]) -> None:
        config = json.loads(json.dumps(config))
        if hasattr(self, "admin_port"):
            config.setdefault("proxy", {})["listen"] = f"127.0.0.1:{self.port}"
            config.setdefault("admin", {})["listen"] = f"127.0.0.1:{self.admin_port}"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin(self, token: str | None = None) -> httpx.Client:
        """An admin API client carrying the bearer token."""
        return httpx.Client(
            base_url=self.admin_url,
            timeout=10,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
        )

    @property
    def ca_path(self) -> Path:
        return self.certs_dir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "egress_auth.cli",
            "run",
            "--config",
            str(self.config_path),
            "--certs-dir",
            str(self.certs_dir),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.proc = subprocess.Popen(
            self.command(),
            # Appended, so a restarted process adds to the same logs the leak checks read.
            stdout=self.stdout_path.open("ab"),
            stderr=self.stderr_path.open("ab"),
            env=self.env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited early ({self.proc.returncode}):\n{self.output()}")
            try:
                wait_port("127.0.0.1", self.port, timeout=0.2)
                wait_port("127.0.0.1", self.admin_port, timeout=0.2)
                return self
            except (OSError, TimeoutError):
                continue
        raise RuntimeError(f"proxy did not start within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def output(self) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return out + err

    def audit_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def wait_audit(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.audit_lines():
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no matching audit line in:\n{self.output()}")

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a proxy's answer head (to a CONNECT, say): the head, and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest
