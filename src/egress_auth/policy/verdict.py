"""One request's whole decision, in the order the proxy takes it. Pure.

The proxy and the admin API's `explain` both call `verdict`, so explain answers with the
very decision the proxy then takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..secrets.material import Secret
from .compile import Snapshot
from .match import RequestFacts, Resolution, TlsSelection, check_traffic, decide_request

Decision = Literal["injected", "denied", "failed-closed", "failed-open", "passed"]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    traffic_rule: str | None = None
    mode: str = "allow-all"
    resolution: Resolution | None = None  # the credential rule that decided, if any
    headers: tuple[tuple[str, Secret], ...] = ()
    reason: str | None = None  # why a credential was not injected, or why traffic was denied

    def explain(self) -> dict[str, object]:
        """The explain answer: names and versions, never a value."""
        r = self.resolution
        return {
            "decision": self.decision,
            "trafficRule": self.traffic_rule,
            "credentialRule": r.rule if r else None,
            "binding": r.binding if r else None,
            "source": r.source if r else None,
            "sourceVersion": r.version if r else None,
            "reason": self.reason,
        }


def verdict(
    snapshot: Snapshot,
    sandbox: str,
    facts: RequestFacts,
    ip: str | None,
    now: float,
    tls: TlsSelection | None,
) -> Verdict:
    """Traffic policy, then the connection's client certificate, then request rules.

    `tls` is the client-certificate selection of the connection the request travels on
    (made when it was opened); mTLS and header rules are separate lists, so a request can
    travel with a certificate and get a header too.
    """
    policy = snapshot.policies.get(sandbox)
    if policy is None:
        return Verdict("denied", mode="block-all", reason="no_policy")
    traffic = check_traffic(policy, facts.host, facts.port, ip)
    if not traffic.allowed:
        return Verdict("denied", traffic.rule, traffic.mode, reason="traffic_policy")
    if ip is None:
        return Verdict("denied", traffic.rule, traffic.mode, reason="unresolvable")
    rule, mode = traffic.rule, traffic.mode
    if tls is not None and tls.resolution.reason is not None and not tls.resolution.fail_open:
        return Verdict("failed-closed", rule, mode, tls.resolution, reason=tls.resolution.reason)
    request = decide_request(snapshot, sandbox, facts, now)
    if request.decision != "passed":
        res = request.resolution
        reason = res.reason if res else None
        return Verdict(request.decision, rule, mode, res, request.headers, reason)
    if tls is not None:
        decided: Decision = "injected" if tls.material is not None else "failed-open"
        return Verdict(decided, rule, mode, tls.resolution, reason=tls.resolution.reason)
    return Verdict("passed", rule, mode)
