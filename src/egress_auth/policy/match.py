"""(snapshot, sandbox, request facts) -> decision. Pure; shared by the proxy and `explain`.

Decisions carry names and versions for logs and error bodies; the only secret they hold is
the rendered header list, as `Secret` values that print as a mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from ..secrets.material import Secret, TlsMaterial
from .compile import CompiledCredentialRule, CompiledPolicy, Snapshot, SourceEntry
from .render import RenderError

Reason = Literal["missing", "expired", "render"]


@dataclass(frozen=True)
class RequestFacts:
    """What a credential rule may look at. `host`/`port` are the ones the client asked for."""

    scheme: str
    host: str  # normalised (lowercase, IDNA, no trailing dot)
    port: int
    method: str
    path: str  # dot segments removed, no query
    query: Sequence[tuple[str, str]] = ()
    headers: Mapping[str, Sequence[str]] | None = None  # lowercased names -> values

    def header_values(self, name: str) -> Sequence[str]:
        return self.headers.get(name, ()) if self.headers else ()

    def query_values(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]


def parse_query(query: str) -> tuple[tuple[str, str], ...]:
    """Split a raw query into (name, value) pairs, percent-decoded.

    '+' is kept as '+': it means a space only in HTML forms, and a rule author writes the
    value they expect to see in the URL.
    """
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return tuple(pairs)


@dataclass(frozen=True)
class TrafficDecision:
    allowed: bool
    rule: str | None  # the traffic rule that decided, or None when `mode` did
    mode: str


def check_traffic(policy: CompiledPolicy, host: str, port: int, ip: str | None) -> TrafficDecision:
    """First matching traffic rule wins; otherwise the policy's mode decides."""
    for rule in policy.traffic.lookup(host):
        if rule.matches_rest(port, ip):
            return TrafficDecision(rule.allow, rule.name, policy.mode)
    return TrafficDecision(policy.mode == "allow-all", None, policy.mode)


def _http_match(rule: CompiledCredentialRule, facts: RequestFacts) -> bool:
    if rule.methods and facts.method not in rule.methods:
        return False
    if (rule.paths or rule.prefixes) and not (
        facts.path in rule.paths or any(facts.path.startswith(p) for p in rule.prefixes)
    ):
        return False
    if not all(c.holds(facts.query_values(c.name)) for c in rule.query):
        return False
    return all(c.holds(facts.header_values(c.name)) for c in rule.headers)


def match_request_rule(
    policy: CompiledPolicy, facts: RequestFacts
) -> CompiledCredentialRule | None:
    if facts.method == "TRACE":  # never inject on TRACE: the upstream would echo the secret
        return None
    for rule in policy.requests.lookup(facts.host):
        if rule.matches_connection(facts.scheme, facts.port) and _http_match(rule, facts):
            return rule
    return None


@dataclass(frozen=True)
class Resolution:
    """Where a rule's credential comes from, and whether it could be had."""

    rule: str
    binding: str
    source: str
    version: int | None
    fail_open: bool
    reason: Reason | None = None  # None: resolved

    @property
    def source_at_version(self) -> str:
        return f"{self.source}@{self.version}" if self.version else self.source


@dataclass(frozen=True)
class RequestDecision:
    decision: Literal["injected", "failed-closed", "failed-open", "passed"]
    resolution: Resolution | None = None
    headers: tuple[tuple[str, Secret], ...] = ()


def _resolve(
    snapshot: Snapshot, rule: CompiledCredentialRule, now: float
) -> tuple[Resolution, SourceEntry | None]:
    b = rule.binding
    entry = snapshot.sources.get(b.source_ref)
    version = entry.version if entry else None
    reason: Reason | None = None
    if entry is None:
        reason = "missing"
    elif entry.material is None or entry.expired(now):
        reason = "expired"
    res = Resolution(rule.name, b.ref, b.source_ref, version, rule.fail_open, reason)
    return res, (entry if reason is None else None)


def decide_request(
    snapshot: Snapshot, sandbox: str, facts: RequestFacts, now: float
) -> RequestDecision:
    policy = snapshot.policies.get(sandbox)
    rule = match_request_rule(policy, facts) if policy else None
    if rule is None:
        return RequestDecision("passed")
    res, entry = _resolve(snapshot, rule, now)
    if entry is not None and entry.material is not None:
        try:
            return RequestDecision("injected", res, rule.binding.render(entry.material))
        except RenderError:
            res = Resolution(
                res.rule, res.binding, res.source, res.version, res.fail_open, "render"
            )
    return RequestDecision("failed-open" if res.fail_open else "failed-closed", res)


@dataclass(frozen=True)
class TlsSelection:
    resolution: Resolution
    material: TlsMaterial | None  # None when it could not resolve


def select_tls(
    snapshot: Snapshot, sandbox: str, host: str, port: int, now: float
) -> TlsSelection | None:
    """The client certificate for a connection, chosen by (sandbox, host, port) alone."""
    policy = snapshot.policies.get(sandbox)
    if policy is None:
        return None
    for rule in policy.tls.lookup(host):
        if rule.matches_connection("https", port):
            res, entry = _resolve(snapshot, rule, now)
            tls = entry.material.tls if entry and entry.material else None
            if entry is not None and tls is None:
                res = Resolution(
                    res.rule, res.binding, res.source, res.version, res.fail_open, "render"
                )
            return TlsSelection(res, tls)
    return None


def could_match(policy: CompiledPolicy, host: str, port: int) -> bool:
    """Whether any credential rule could apply to a connection (for `intercept: matching`)."""
    return any(r.matches_connection("https", port) for r in policy.requests.lookup(host)) or any(
        r.matches_connection("https", port) for r in policy.tls.lookup(host)
    )
