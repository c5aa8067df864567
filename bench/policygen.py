"""Rule sets for the benchmark, as wire-format dicts (camelCase, as in the config file).

Both the end-to-end run (`run.py`, written into a config file) and the decision
micro-benchmark (`microbench.py`, validated into models) use these, so they measure the
same rule shapes.

The ten rules of one sandbox (``sandbox_network``) mix what real policies hold: exact hosts,
wildcards, path prefixes, methods, ports, a header condition, an mTLS rule. Three of them
name the benchmark's target host and port, and the first two of those do not match the
benchmark request (``GET /v1/bench``), so the matcher has to look at and reject candidates
before it finds the one that injects.
"""

from __future__ import annotations

from typing import Any

HEADER_REF = "hdr"
CERT_REF = "cert"
BENCH_PATH = "/v1/bench"


def header_binding(ref: str, source: str) -> dict[str, Any]:
    return {
        "ref": ref,
        "sourceRef": source,
        "projection": {
            "type": "http_headers",
            "httpHeaders": {
                "headers": [{"name": "Authorization", "valueTemplate": "Bearer {{ .token }}"}]
            },
        },
    }


def cert_binding(ref: str, source: str) -> dict[str, Any]:
    return {"ref": ref, "sourceRef": source, "projection": {"type": "tls_client_certificate"}}


def filler_rule(k: int, ref: str = HEADER_REF) -> dict[str, Any]:
    """A rule on a host of its own (`svc<k>.bench.test` family); five shapes in turn."""
    shape = k % 5
    base = f"svc{k}.bench.test"
    if shape == 0:
        return {"name": f"api-{k}", "credentialRef": ref, "domains": [f"api.{base}"]}
    if shape == 1:
        return {"name": f"cdn-{k}", "credentialRef": ref, "domains": [f"*.cdn.{base}"]}
    if shape == 2:
        return {
            "name": f"git-{k}",
            "credentialRef": ref,
            "domains": [f"git.{base}"],
            "httpMatch": {"pathPrefixes": ["/repos/", "/orgs/"]},
        }
    if shape == 3:
        return {
            "name": f"reg-{k}",
            "credentialRef": ref,
            "domains": [f"registry.{base}"],
            "ports": [{"port": 443}, {"port": 5000, "endPort": 5001}],
            "httpMatch": {"methods": ["GET", "HEAD"]},
        }
    return {"name": f"wild-{k}", "credentialRef": ref, "domains": [f"*.{base}"]}


def target_rules(tag: str, host: str, port: int, ref: str = HEADER_REF) -> list[dict[str, Any]]:
    """Two rules on the target that do not match the benchmark request, then one that does."""
    ports = [{"port": port}]
    return [
        {
            "name": f"admin-{tag}",
            "credentialRef": ref,
            "domains": [host],
            "ports": ports,
            "httpMatch": {"pathPrefixes": ["/admin/"]},
        },
        {
            "name": f"flag-{tag}",
            "credentialRef": ref,
            "domains": [host],
            "ports": ports,
            "httpMatch": {"headers": [{"name": "X-Bench-Flag", "present": True}]},
        },
        {
            "name": f"v1-{tag}",
            "credentialRef": ref,
            "domains": [host],
            "ports": ports,
            "httpMatch": {"pathPrefixes": ["/v1/"]},
        },
    ]


def mtls_rule(tag: str, host: str, port: int, ref: str = CERT_REF) -> dict[str, Any]:
    return {
        "name": f"mtls-{tag}",
        "credentialRef": ref,
        "domains": [host],
        "ports": [{"port": port}],
    }


def sandbox_network(
    i: int, host: str, echo_port: int, mtls_port: int, token_source: str, cert_source: str
) -> dict[str, Any]:
    """Ten rules: five fillers, the three target rules, the mTLS rule, one more filler."""
    rules = [filler_rule(i * 10 + k) for k in range(5)]
    rules += target_rules(str(i), host, echo_port)
    rules.append(mtls_rule(str(i), host, mtls_port))
    rules.append(filler_rule(i * 10 + 9))
    return {
        "egress": {"credentialRules": rules},
        "credentialBindings": [
            header_binding(HEADER_REF, token_source),
            cert_binding(CERT_REF, cert_source),
        ],
    }


def one_rule_network(
    host: str, echo_port: int, mtls_port: int, token_source: str, cert_source: str
) -> dict[str, Any]:
    """One rule per upstream: a header rule for the echo upstream, an mTLS one for the other."""
    return {
        "egress": {
            "credentialRules": [
                {
                    "name": "echo",
                    "credentialRef": HEADER_REF,
                    "domains": [host],
                    "ports": [{"port": echo_port}],
                },
                mtls_rule("one", host, mtls_port),
            ]
        },
        "credentialBindings": [
            header_binding(HEADER_REF, token_source),
            cert_binding(CERT_REF, cert_source),
        ],
    }


def single_policy(n_rules: int, host: str, port: int) -> dict[str, Any]:
    """One policy holding n_rules header rules: fillers, with the 3 target rules in the middle."""
    n_fill = max(0, n_rules - 3)
    middle = n_fill // 2
    rules = [filler_rule(k) for k in range(middle)]
    rules += target_rules("t", host, port)
    rules += [filler_rule(k) for k in range(middle, n_fill)]
    return {
        "mode": "allow-all",
        "egress": {"credentialRules": rules},
        "credentialBindings": [header_binding(HEADER_REF, "tok")],
    }
