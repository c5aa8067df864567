"""Wire-format builders for the policies tests write (camelCase dicts, as in the config file
and the admin API), so every test spells a binding or a rule the same way."""

from __future__ import annotations

from typing import Any

BEARER = "Bearer {{ .token }}"


def header_binding(
    ref: str, source: str, header: str = "Authorization", template: str = BEARER
) -> dict[str, Any]:
    """A binding that sets one header from `source` (default: `Authorization: Bearer`)."""
    return {
        "ref": ref,
        "sourceRef": source,
        "projection": {
            "type": "http_headers",
            "httpHeaders": {"headers": [{"name": header, "valueTemplate": template}]},
        },
    }


def cert_binding(ref: str, source: str) -> dict[str, Any]:
    return {"ref": ref, "sourceRef": source, "projection": {"type": "tls_client_certificate"}}


def credential_rule(name: str, ref: str, domains: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "credentialRef": ref, "domains": domains, **kw}


def template(
    name: str,
    rules: list[dict[str, Any]],
    bindings: list[dict[str, Any]],
    traffic: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A template whose network has these credential rules, bindings and traffic rules."""
    egress: dict[str, Any] = {"credentialRules": rules}
    if traffic:
        egress["trafficRules"] = traffic
    return {
        "name": name,
        "spec": {"network": {"egress": egress, "credentialBindings": bindings}},
    }
