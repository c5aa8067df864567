"""Policy -> immutable Snapshot: indexes and prepared projections, built once per change.

A request reads one Snapshot at its start and never sees a half-applied change; a change
builds a new Snapshot and swaps it in with one assignment (see `state.py`).
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..model.policy import (
    CredentialBinding,
    CredentialRule,
    HttpHeadersProjection,
    PortSpec,
    SandboxNetworkPolicy,
    TlsClientCertificateProjection,
    TrafficRule,
    UsernamePasswordProjection,
    ValueMatch,
)
from ..secrets.material import Material, Secret
from .domains import DomainIndex, DomainPattern, parse_domain_pattern
from .render import RenderError, ValueTemplate, parse_value_template

_generation = itertools.count(1)


def next_generation() -> int:
    """Each snapshot's number, for logs and /metrics: strictly increasing per process."""
    return next(_generation)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ports_match(ports: tuple[PortSpec, ...], port: int) -> bool:
    return not ports or any(p.contains(port) for p in ports)


@dataclass(frozen=True)
class CompiledTrafficRule:
    index: int
    name: str
    allow: bool
    networks: tuple[Network, ...]
    ports: tuple[PortSpec, ...]

    def matches_rest(self, port: int, ip: str | None) -> bool:
        """Everything but the domain, which the index has already checked."""
        if not _ports_match(self.ports, port):
            return False
        if self.networks:
            if ip is None:
                return False
            addr = ipaddress.ip_address(ip)
            return any(addr in n for n in self.networks)
        return True


@dataclass(frozen=True)
class ValueCondition:
    name: str  # lowercased for headers
    values: frozenset[str]
    present: bool

    def holds(self, found: Sequence[str]) -> bool:
        if not self.present:
            return not found
        if not self.values:
            return bool(found)
        return any(v in self.values for v in found)


@dataclass(frozen=True)
class CompiledBinding:
    ref: str
    source_ref: str
    kind: Literal["headers", "basic", "tls"]
    headers: tuple[tuple[str, ValueTemplate], ...] = ()

    def render(self, material: Material) -> tuple[tuple[str, Secret], ...]:
        """The headers to set. Raises RenderError (never carrying a value)."""
        if self.kind == "basic":
            try:
                user, pw = material.values["username"], material.values["password"]
            except KeyError:
                raise RenderError("source has no username/password") from None
            token = base64.b64encode(f"{user.reveal()}:{pw.reveal()}".encode()).decode()
            return (("Authorization", Secret(f"Basic {token}")),)
        values = {k: v.reveal() for k, v in material.values.items()}
        return tuple((name, Secret(t.render(values))) for name, t in self.headers)


@dataclass(frozen=True)
class CompiledCredentialRule:
    index: int
    name: str
    binding: CompiledBinding
    scheme: str
    ports: tuple[PortSpec, ...]
    fail_open: bool
    methods: frozenset[str]
    paths: frozenset[str]
    prefixes: tuple[str, ...]
    query: tuple[ValueCondition, ...]
    headers: tuple[ValueCondition, ...]

    def matches_connection(self, scheme: str, port: int) -> bool:
        return scheme == self.scheme and _ports_match(self.ports, port)


@dataclass(frozen=True)
class CompiledPolicy:
    mode: Literal["allow-all", "block-all"]
    traffic: DomainIndex[CompiledTrafficRule]
    # Request-level rules (header and basic auth) and connection-level rules (mTLS) are kept
    # apart: each list is first-match-wins on its own, so one host can have both.
    requests: DomainIndex[CompiledCredentialRule]
    tls: DomainIndex[CompiledCredentialRule]
    rule_count: int


@dataclass(frozen=True)
class SourceEntry:
    """One source's current version as the proxy sees it. `material` is None once purged."""

    name: str
    version: int
    kind: str
    material: Material | None
    expires_at: float | None = None  # epoch seconds

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class Snapshot:
    policies: Mapping[str, CompiledPolicy]  # by sandbox id (`default`: clients without one)
    sources: Mapping[str, SourceEntry]
    identities: Mapping[str, bytes] = field(default_factory=dict)  # sandbox id -> token hash
    auth_required: bool = False  # proxy.sandboxAuth: required
    generation: int = field(default_factory=next_generation)


def _conditions(items: Sequence[ValueMatch], lower: bool) -> tuple[ValueCondition, ...]:
    return tuple(
        ValueCondition(m.name.lower() if lower else m.name, frozenset(m.values), m.present)
        for m in items
    )


def _compile_binding(b: CredentialBinding) -> CompiledBinding:
    p = b.projection
    if isinstance(p, HttpHeadersProjection):
        headers = tuple(
            (h.name, parse_value_template(h.value_template)) for h in p.http_headers.headers
        )
        return CompiledBinding(b.ref, b.source_ref, "headers", headers)
    if isinstance(p, UsernamePasswordProjection):
        return CompiledBinding(b.ref, b.source_ref, "basic")
    if isinstance(p, TlsClientCertificateProjection):
        return CompiledBinding(b.ref, b.source_ref, "tls")
    raise ValueError(f"projection {p.type!r} is not supported yet")


def _default_ports(rule: CredentialRule) -> tuple[PortSpec, ...]:
    if rule.ports:
        return tuple(rule.ports)
    return (PortSpec(port=443 if rule.protocol == "https" else 80),)


def _compile_credential_rule(
    i: int, rule: CredentialRule, binding: CompiledBinding
) -> CompiledCredentialRule:
    m = rule.http_match
    return CompiledCredentialRule(
        index=i,
        name=rule.name,
        binding=binding,
        scheme=rule.protocol,
        ports=_default_ports(rule),
        fail_open=rule.failure_policy == "fail-open",
        methods=frozenset(m.methods) if m else frozenset(),
        paths=frozenset(m.paths) if m else frozenset(),
        prefixes=tuple(m.path_prefixes) if m else (),
        query=_conditions(m.query, lower=False) if m else (),
        headers=_conditions(m.headers, lower=True) if m else (),
    )


def _compile_traffic_rule(i: int, rule: TrafficRule) -> CompiledTrafficRule:
    return CompiledTrafficRule(
        index=i,
        name=rule.name,
        allow=rule.action == "allow",
        networks=tuple(ipaddress.ip_network(c, strict=False) for c in rule.cidrs),
        ports=tuple(rule.ports),
    )


def compile_policy(policy: SandboxNetworkPolicy) -> CompiledPolicy:
    """Compile one validated effective policy. Rules with rollout: disabled are left out."""
    bindings = {b.ref: _compile_binding(b) for b in policy.credential_bindings}
    traffic = DomainIndex(
        [
            ([parse_domain_pattern(d) for d in r.domains], _compile_traffic_rule(i, r))
            for i, r in enumerate(policy.egress.traffic_rules)
        ]
    )
    request_entries: list[tuple[list[DomainPattern], CompiledCredentialRule]] = []
    tls_entries: list[tuple[list[DomainPattern], CompiledCredentialRule]] = []
    for i, rule in enumerate(policy.egress.credential_rules):
        if rule.rollout == "disabled":
            continue
        binding = bindings.get(rule.credential_ref)
        if binding is None:  # validation refuses this; a snapshot never holds a dangling rule
            raise ValueError(f"rule {rule.name!r}: no binding {rule.credential_ref!r}")
        compiled = _compile_credential_rule(i, rule, binding)
        entry = ([parse_domain_pattern(d) for d in rule.domains], compiled)
        (tls_entries if binding.kind == "tls" else request_entries).append(entry)
    return CompiledPolicy(
        mode=policy.mode,
        traffic=traffic,
        requests=DomainIndex(request_entries),
        tls=DomainIndex(tls_entries),
        rule_count=len(policy.egress.credential_rules),
    )
