"""One JSON line per proxied request that a rule touched or a policy refused (SPEC section 7).

Fields are names, versions, numbers and the request path (never its query, never a header
value): an audit line can be shipped anywhere without becoming a leak.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from .metrics import METRICS

# Fields every line of this process carries: `worker` under `run --workers N`.
STATIC: dict[str, Any] = {}
_out: TextIO | None = None


def setup(stream: TextIO | None = None) -> None:
    """Audit lines go to stdout as bare JSON, apart from mitmproxy's own log lines (stderr).

    Written straight to the stream, one write and one flush per line (not through `logging`,
    whose record machinery cost more than the rest of the line): a line is out of the
    process when its request is done, and lines of several processes sharing one stdout do
    not interleave mid-line.
    """
    global _out
    if _out is None:
        _out = stream or sys.stdout


@dataclass
class AuditEvent:
    sandbox: str
    method: str
    host: str
    port: int
    path: str
    decision: str
    traffic_rule: str | None = None
    credential_rule: str | None = None
    binding: str | None = None
    source: str | None = None  # "name@version"
    reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)

    def emit(self, status: int | None) -> None:
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "sandbox": self.sandbox,
            "method": self.method,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "decision": self.decision,
            "trafficRule": self.traffic_rule,
            "credentialRule": self.credential_rule,
            "binding": self.binding,
            "source": self.source,
            "reason": self.reason,
            "status": status,
            "durationMs": round((time.monotonic() - self.started) * 1000, 2),
            **self.extra,
            **STATIC,
        }
        out = _out or sys.stdout
        out.write(json.dumps({k: v for k, v in line.items() if v is not None}) + "\n")
        out.flush()
        METRICS.inc("egress_auth_requests_total", decision=self.decision)
        if self.decision == "injected" and self.credential_rule:
            METRICS.inc("egress_auth_injections_total", rule=self.credential_rule)
        if self.reason == "upstream_tls":
            METRICS.inc("egress_auth_upstream_tls_errors_total")
        elif self.decision in ("failed-closed", "failed-open") and self.reason:
            METRICS.inc("egress_auth_resolution_failures_total", reason=self.reason)
