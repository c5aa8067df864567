"""One JSON line per proxied request that a rule touched or a policy refused (SPEC section 7).

Fields are names, versions, numbers and the request path (never its query, never a header
value): an audit line can be shipped anywhere without becoming a leak.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .metrics import METRICS

logger = logging.getLogger("egress_auth.audit")
# Fields every line of this process carries: `worker` under `run --workers N`.
STATIC: dict[str, Any] = {}


def setup(stream: Any = None) -> None:
    """Audit lines go to stdout as bare JSON, apart from mitmproxy's own log lines."""
    if any(getattr(h, "_egress_audit", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._egress_audit = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


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
        logger.info(json.dumps({k: v for k, v in line.items() if v is not None}))
        METRICS.inc("egress_auth_requests_total", decision=self.decision)
        if self.decision == "injected" and self.credential_rule:
            METRICS.inc("egress_auth_injections_total", rule=self.credential_rule)
        if self.reason == "upstream_tls":
            METRICS.inc("egress_auth_upstream_tls_errors_total")
        elif self.decision in ("failed-closed", "failed-open") and self.reason:
            METRICS.inc("egress_auth_resolution_failures_total", reason=self.reason)
