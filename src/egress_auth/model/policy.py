"""SandboxNetworkPolicy and Template wire models (SPEC section 2).

Shape and per-field checks live here; checks that need more than one object (a rule's
credentialRef names a binding, a template key exists in the source) live in
`policy.validate`, so they can be reported together with their places.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from ..policy.domains import parse_domain_pattern
from ..policy.render import header_name_problem, parse_value_template
from .base import Name, WireModel

_METHOD_RE = re.compile(r"^[A-Z]+$")


def _check_domain(value: str) -> str:
    parse_domain_pattern(value)  # raises ValueError with the reason
    return value


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise ValueError(f"not an IP network in CIDR form ({e})") from None
    return value


def _check_method(value: str) -> str:
    if not _METHOD_RE.match(value):
        raise ValueError("must be an uppercase HTTP method such as GET or POST")
    return value


def _check_template(value: str) -> str:
    parse_value_template(value)
    return value


def _check_header_name(value: str) -> str:
    problem = header_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Domain = Annotated[str, AfterValidator(_check_domain)]
Cidr = Annotated[str, AfterValidator(_check_cidr)]
Method = Annotated[str, AfterValidator(_check_method)]


class PortSpec(WireModel):
    port: int = Field(ge=1, le=65535)
    end_port: int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _range_in_order(self) -> PortSpec:
        if self.end_port is not None and self.end_port < self.port:
            raise ValueError("endPort must not be lower than port")
        return self

    def contains(self, port: int) -> bool:
        return self.port <= port <= (self.end_port or self.port)


class TrafficRule(WireModel):
    name: Name
    action: Literal["allow", "deny"]
    domains: list[Domain] = []
    cidrs: list[Cidr] = []
    ports: list[PortSpec] = []


class ValueMatch(WireModel):
    """A query parameter or header condition."""

    name: str = Field(min_length=1)
    values: list[str] = []
    present: bool = True

    @model_validator(mode="after")
    def _values_need_presence(self) -> ValueMatch:
        if self.values and not self.present:
            raise ValueError("'values' cannot be combined with present: false")
        return self


class HttpMatch(WireModel):
    methods: list[Method] = []
    paths: list[str] = []
    path_prefixes: list[str] = []
    query: list[ValueMatch] = []
    headers: list[ValueMatch] = []

    @model_validator(mode="after")
    def _paths_are_absolute(self) -> HttpMatch:
        for p in (*self.paths, *self.path_prefixes):
            if not p.startswith("/"):
                raise ValueError(f"path {p!r} must start with '/'")
            if "?" in p or "#" in p:
                raise ValueError(f"path {p!r} must not contain a query or fragment")
        return self


class CredentialRule(WireModel):
    name: Name
    credential_ref: Name
    protocol: Literal["https", "http"] = "https"
    domains: list[Domain] = []
    ports: list[PortSpec] = []
    http_match: HttpMatch | None = None
    tls_mode: Literal["terminate-reoriginate"] = "terminate-reoriginate"
    failure_policy: Literal["fail-closed", "fail-open"] = "fail-closed"
    rollout: Literal["enabled", "disabled"] = "enabled"


class HeaderTemplate(WireModel):
    name: Annotated[str, AfterValidator(_check_header_name)]
    value_template: Annotated[str, AfterValidator(_check_template)]


class HttpHeaders(WireModel):
    headers: list[HeaderTemplate] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> HttpHeaders:
        seen: set[str] = set()
        for h in self.headers:
            if h.name.lower() in seen:
                raise ValueError(f"header {h.name!r} is set twice")
            seen.add(h.name.lower())
        return self


class HttpHeadersProjection(WireModel):
    type: Literal["http_headers"]
    http_headers: HttpHeaders


class UsernamePasswordProjection(WireModel):
    type: Literal["username_password"]


class TlsClientCertificateProjection(WireModel):
    type: Literal["tls_client_certificate"]


class Replacement(WireModel):
    placeholder: str
    value_template: str
    locations: list[Literal["header", "query", "body"]] = []


class PlaceholderSubstitution(WireModel):
    replacements: list[Replacement] = []


class PlaceholderSubstitutionProjection(WireModel):
    type: Literal["placeholder_substitution"]
    placeholder_substitution: PlaceholderSubstitution | None = None

    @model_validator(mode="after")
    def _not_yet(self) -> PlaceholderSubstitutionProjection:
        raise ValueError("projection type 'placeholder_substitution' is not supported yet")


Projection = Annotated[
    HttpHeadersProjection
    | UsernamePasswordProjection
    | TlsClientCertificateProjection
    | PlaceholderSubstitutionProjection,
    Field(discriminator="type"),
]


class CachePolicy(WireModel):
    ttl: Annotated[str, Field(pattern=r"^[0-9]+(ms|s|m|h)$")] | None = None


class CredentialBinding(WireModel):
    ref: Name
    source_ref: Name
    projection: Projection
    cache_policy: CachePolicy | None = None


class Egress(WireModel):
    traffic_rules: list[TrafficRule] = []
    credential_rules: list[CredentialRule] = []


class SandboxNetworkPolicy(WireModel):
    mode: Literal["allow-all", "block-all"] = "allow-all"
    egress: Egress = Egress()
    credential_bindings: list[CredentialBinding] = []


class TemplateSpec(WireModel):
    network: SandboxNetworkPolicy = SandboxNetworkPolicy()


class Template(WireModel):
    name: Name
    description: str | None = None
    spec: TemplateSpec = TemplateSpec()


class TemplateReplace(WireModel):
    """The body of a PUT: the name comes from the path (and must match it when given)."""

    name: Name | None = None
    description: str | None = None
    spec: TemplateSpec = TemplateSpec()
