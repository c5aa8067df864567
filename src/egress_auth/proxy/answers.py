"""The proxy's own answers to the sandbox (SPEC section 3): JSON body plus X-Egress-Auth-Error.

Bodies name rules, bindings and sources so a user can fix a refusal without the proxy's
logs; they are built from names and reasons only, never from material.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from ..policy.match import Resolution

ERROR_HEADER = "X-Egress-Auth-Error"

_REASON_TEXT = {
    "missing": "does not exist",
    "expired": "has expired",
    "render": "cannot be rendered for this binding",
}


def error_response(status: int, code: str, message: str, **extra: Any) -> http.Response:
    body = {"error": code, "message": message, **extra}
    headers = {
        "Content-Type": "application/json",
        ERROR_HEADER: code,
        "Cache-Control": "no-store",
    }
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="egress-auth"'
    return http.Response.make(status, json.dumps(body).encode() + b"\n", headers)


def proxy_auth_required(why: str) -> http.Response:
    return error_response(
        407,
        "proxy_auth_required",
        f"{why}: send Proxy-Authorization: Basic base64(sandboxId:token), e.g. "
        "HTTPS_PROXY=http://ID:TOKEN@host:port",
    )


def egress_denied(host: str, port: int, rule: str | None, mode: str) -> http.Response:
    where = {"rule": rule} if rule else {"mode": mode}
    why = f"traffic rule {rule!r}" if rule else f"mode {mode!r} (no traffic rule matched)"
    return error_response(
        403,
        "egress_denied",
        f"egress to {host}:{port} is denied by {why}",
        host=host,
        port=port,
        **where,
    )


def credential_unavailable(res: Resolution) -> http.Response:
    reason = res.reason or "missing"
    return error_response(
        503,
        "credential_unavailable",
        f"credential rule {res.rule!r} needs binding {res.binding!r}, whose source "
        f"{res.source!r} {_REASON_TEXT[reason]}; the rule is fail-closed, so the request "
        "was not sent",
        rule=res.rule,
        binding=res.binding,
        source=res.source,
        reason=reason,
    )


def upstream_tls_error(host: str, port: int, detail: str) -> http.Response:
    return error_response(
        502,
        "upstream_tls_error",
        f"TLS with the upstream {host}:{port} failed: {detail}",
        host=host,
        port=port,
    )


def unresolvable(host: str, port: int) -> http.Response:
    return error_response(
        502, "upstream_unresolvable", f"cannot resolve {host}:{port}", host=host, port=port
    )
