"""Prometheus counters kept in process (SPEC section 7).

Labels are decisions, rule names, reasons and resources: names chosen by the operator,
never values taken from a request or a source.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

Counters = list[tuple[str, list[tuple[str, str]], int]]  # Metrics.export(), across processes

_HELP = {
    "egress_auth_requests_total": ("counter", "Proxied requests by decision."),
    "egress_auth_injections_total": ("counter", "Credential injections by rule."),
    "egress_auth_resolution_failures_total": (
        "counter",
        "Credentials that could not be resolved, by reason.",
    ),
    "egress_auth_upstream_tls_errors_total": ("counter", "Upstream TLS failures."),
    "egress_auth_admin_writes_total": ("counter", "Admin API writes by resource and method."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counts[key] += 1

    def value(self, name: str, **labels: str) -> int:
        return self._counts[(name, tuple(sorted(labels.items())))]

    def export(self) -> Counters:
        """The counters as plain data, for another process to add to its own."""
        with self._lock:
            return [(name, list(labels), v) for (name, labels), v in self._counts.items()]

    def render(self, *others: Counters) -> str:
        """Prometheus text; `others` (other processes' `export()`s) are summed in."""
        lines: list[str] = []
        with self._lock:
            total = Counter(self._counts)
        for exported in others:
            for name, pairs, v in exported:
                total[(name, tuple((str(k), str(x)) for k, x in pairs))] += int(v)
        counts = sorted(total.items())
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for (n, labels), v in counts:
                if n == name:
                    rendered = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
                    lines.append(f"{name}{{{rendered}}} {v}" if rendered else f"{name} {v}")
        for name, fn in sorted(self.gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {fn()}"]
        return "\n".join(lines) + "\n"


METRICS = Metrics()
