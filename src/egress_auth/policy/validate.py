"""Checks that span objects: references between rules, bindings and sources, and what each
projection needs from its source. Pure: takes models, returns (place, message, severity)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from ..model.policy import (
    CredentialBinding,
    HttpHeadersProjection,
    SandboxNetworkPolicy,
    TlsClientCertificateProjection,
    UsernamePasswordProjection,
)
from ..model.sources import CredentialSource
from ..secrets.material import MaterialError, load_tls_material
from .effective import effective_policy
from .render import parse_value_template

if TYPE_CHECKING:
    from ..model.config import ConfigFile

Severity = Literal["error", "warning"]
Found = tuple[tuple[str | int, ...], str, Severity]

# Which source kinds each projection can use.
PROJECTION_KINDS: dict[type, frozenset[str]] = {
    HttpHeadersProjection: frozenset({"static_headers", "static_username_password"}),
    UsernamePasswordProjection: frozenset({"static_username_password"}),
    TlsClientCertificateProjection: frozenset({"static_tls_client_certificate"}),
}


def format_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _duplicates(names: list[str]) -> Iterator[int]:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            yield i
        seen.add(n)


class SourceLike(Protocol):
    """What binding checks need of a source: a declared CredentialSource, or a KnownSource
    standing for one created through the API."""

    @property
    def name(self) -> str: ...
    @property
    def resolver_kind(self) -> str: ...
    def keys(self) -> frozenset[str] | None: ...


@dataclass(frozen=True)
class KnownSource:
    name: str
    resolver_kind: str
    key_set: frozenset[str] | None  # None: unknown (material purged)

    def keys(self) -> frozenset[str] | None:
        return self.key_set


def validate_binding(
    binding: CredentialBinding, source: SourceLike | None
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Problems of one binding against its source (when the source is known)."""
    if source is None:
        return
    kinds = PROJECTION_KINDS.get(type(binding.projection), frozenset())
    if source.resolver_kind not in kinds:
        yield (
            ("projection", "type"),
            f"projection {binding.projection.type!r} cannot use source {source.name!r} of "
            f"kind {source.resolver_kind!r} (needs {' or '.join(sorted(kinds))})",
        )
        return
    keys = source.keys()
    if isinstance(binding.projection, HttpHeadersProjection) and keys is not None:
        for i, h in enumerate(binding.projection.http_headers.headers):
            missing = parse_value_template(h.value_template).keys - keys
            for key in sorted(missing):
                yield (
                    ("projection", "httpHeaders", "headers", i, "valueTemplate"),
                    f"refers to key {key!r}, which source {source.name!r} does not have "
                    f"(it has: {', '.join(sorted(keys)) or 'none'})",
                )


def validate_policy(
    policy: SandboxNetworkPolicy,
    sources: Mapping[str, SourceLike],
    broken_sources: frozenset[str] = frozenset(),
) -> Iterator[Found]:
    """Cross-object problems of one policy. `broken_sources` are declared but invalid (their
    own errors are reported elsewhere): bindings to them are not checked again."""
    egress = policy.egress
    for i in _duplicates([r.name for r in egress.traffic_rules]):
        yield (("egress", "trafficRules", i, "name"), "duplicate traffic rule name", "error")
    for i in _duplicates([r.name for r in egress.credential_rules]):
        yield (("egress", "credentialRules", i, "name"), "duplicate credential rule name", "error")
    for i in _duplicates([b.ref for b in policy.credential_bindings]):
        yield (("credentialBindings", i, "ref"), "duplicate binding ref", "error")

    bindings = {b.ref: b for b in policy.credential_bindings}
    for i, b in enumerate(policy.credential_bindings):
        if b.source_ref in broken_sources:
            continue
        source = sources.get(b.source_ref)
        if source is None:
            yield (
                ("credentialBindings", i, "sourceRef"),
                f"source {b.source_ref!r} is not declared in this file; its fail-closed rules "
                "answer 503 until it is created through the API",
                "warning",
            )
        for loc, msg in validate_binding(b, source):
            yield (("credentialBindings", i, *loc), msg, "error")

    for i, rule in enumerate(egress.credential_rules):
        here = ("egress", "credentialRules", i)
        binding = bindings.get(rule.credential_ref)
        if binding is None:
            yield (
                (*here, "credentialRef"),
                f"no credentialBinding has ref {rule.credential_ref!r}",
                "error",
            )
            continue
        if isinstance(binding.projection, TlsClientCertificateProjection):
            if rule.http_match is not None:
                yield (
                    (*here, "httpMatch"),
                    "a rule for a tls_client_certificate binding cannot have httpMatch: the "
                    "upstream handshake happens before any request is seen",
                    "error",
                )
            if rule.protocol != "https":
                yield (
                    (*here, "protocol"),
                    "a tls_client_certificate binding needs protocol https",
                    "error",
                )


def validate_source(source: CredentialSource) -> Iterator[tuple[tuple[str | int, ...], str]]:
    tls = source.spec.static_tls_client_certificate
    if tls is None:
        return
    try:
        load_tls_material(tls.certificate_pem, tls.private_key_pem.get_secret_value(), tls.ca_pem)
    except MaterialError as e:
        yield (("spec", "staticTLSClientCertificate", e.field), e.reason)


def validate_config(config: ConfigFile) -> list[Found]:
    found: list[Found] = []
    sources = {s.name: s for s in config.sources}
    for i in _duplicates([s.name for s in config.sources]):
        found.append((("sources", i, "name"), "duplicate source name", "error"))
    for i, s in enumerate(config.sources):
        found.extend((("sources", i, *loc), msg, "error") for loc, msg in validate_source(s))
    names = [t.name for t in config.templates]
    for i in _duplicates(names):
        found.append((("templates", i, "name"), "duplicate template name", "error"))
    for i, t in enumerate(config.templates):
        for loc, msg, sev in validate_policy(t.spec.network, sources):
            found.append((("templates", i, "spec", "network", *loc), msg, sev))
    if names and config.proxy.default_template not in names:
        found.append(
            (
                ("proxy", "defaultTemplate"),
                f"no template is named {config.proxy.default_template!r}",
                "error",
            )
        )
    for i in _duplicates([s.id for s in config.sandboxes]):
        found.append((("sandboxes", i, "id"), "duplicate sandbox id", "error"))
    templates = {t.name: t for t in config.templates}
    for i, sb in enumerate(config.sandboxes):
        if sb.id == "default":
            found.append((("sandboxes", i, "id"), "'default' is reserved", "error"))
        template = templates.get(sb.template)
        if template is None:
            found.append((("sandboxes", i, "template"), f"no template {sb.template!r}", "error"))
        elif sb.network is not None:
            # Check what the sandbox will run: its template merged with its overrides.
            merged = effective_policy(template.spec.network, sb.network)
            for loc, msg, sev in validate_policy(merged, sources):
                where = format_path(loc)
                found.append((("sandboxes", i, "network"), f"effective policy {where}: {msg}", sev))
    return found
