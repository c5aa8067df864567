"""The pure policy engine: compile a policy, then match traffic, requests and TLS connections."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auth.model.config import ConfigFile
from egress_auth.model.policy import SandboxNetworkPolicy
from egress_auth.policy.compile import CompiledPolicy, Snapshot, SourceEntry, compile_policy
from egress_auth.policy.match import (
    RequestFacts,
    check_traffic,
    could_match,
    decide_request,
    parse_query,
    select_tls,
)
from egress_auth.secrets.material import MASK, Material, Secret, load_tls_material
from egress_auth.state import DEFAULT_SANDBOX, Versioned, build_snapshot
from tests.support.pki import TestPKI

NOW = 1_700_000_000.0
TOKEN = "tok-SECRET-123"

BINDINGS: list[dict[str, Any]] = [
    {
        "ref": "hdr",
        "sourceRef": "tok",
        "projection": {
            "type": "http_headers",
            "httpHeaders": {
                "headers": [{"name": "Authorization", "valueTemplate": "Bearer {{ .token }}"}]
            },
        },
    },
    {"ref": "basic", "sourceRef": "up", "projection": {"type": "username_password"}},
    {"ref": "mtls", "sourceRef": "cert", "projection": {"type": "tls_client_certificate"}},
]


def compiled(
    rules: list[dict[str, Any]],
    *,
    traffic: list[dict[str, Any]] | None = None,
    mode: str = "allow-all",
    bindings: list[dict[str, Any]] | None = None,
) -> CompiledPolicy:
    policy = SandboxNetworkPolicy.model_validate(
        {
            "mode": mode,
            "egress": {"trafficRules": traffic or [], "credentialRules": rules},
            "credentialBindings": BINDINGS if bindings is None else bindings,
        }
    )
    return compile_policy(policy)


def headers_entry(values: dict[str, str] | None = None, **kw: Any) -> SourceEntry:
    vals = {"token": TOKEN} if values is None else values
    material = Material(values={k: Secret(v) for k, v in vals.items()})
    return SourceEntry("tok", kw.pop("version", 1), "static_headers", material, **kw)


def up_entry(user: str = "alice", password: str = "pa:ss") -> SourceEntry:
    material = Material(values={"username": Secret(user), "password": Secret(password)})
    return SourceEntry("up", 1, "static_username_password", material)


def snap(policy: CompiledPolicy, *entries: SourceEntry) -> Snapshot:
    if not entries:
        entries = (headers_entry(), up_entry())
    return Snapshot(policies={DEFAULT_SANDBOX: policy}, sources={e.name: e for e in entries})


def facts(
    host: str = "api.example.com",
    *,
    scheme: str = "https",
    port: int | None = None,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: dict[str, list[str]] | None = None,
) -> RequestFacts:
    return RequestFacts(
        scheme=scheme,
        host=host,
        port=port if port is not None else (443 if scheme == "https" else 80),
        method=method,
        path=path,
        query=parse_query(query),
        headers=headers,
    )


def rule(name: str, ref: str = "hdr", **fields: Any) -> dict[str, Any]:
    return {"name": name, "credentialRef": ref, **fields}


def chosen(snapshot: Snapshot, f: RequestFacts) -> str | None:
    d = decide_request(snapshot, DEFAULT_SANDBOX, f, NOW)
    return d.resolution.rule if d.resolution else None


# --- order, rollout, failure policy ------------------------------------------------------------


def test_first_match_wins_in_list_order() -> None:
    rules = [rule("a", domains=["api.example.com"]), rule("b", domains=["api.example.com"])]
    assert chosen(snap(compiled(rules)), facts()) == "a"
    assert chosen(snap(compiled(rules[::-1])), facts()) == "b"


def test_order_holds_across_exact_and_wildcard_patterns() -> None:
    wild_first = [
        rule("wild", domains=["*.example.com"]),
        rule("exact", domains=["api.example.com"]),
    ]
    assert chosen(snap(compiled(wild_first)), facts()) == "wild"
    assert chosen(snap(compiled(wild_first[::-1])), facts()) == "exact"
    catch_all_last = [rule("exact", domains=["api.example.com"]), rule("any")]
    assert chosen(snap(compiled(catch_all_last)), facts()) == "exact"
    assert chosen(snap(compiled(catch_all_last)), facts("other.test")) == "any"


def test_wildcard_is_not_the_apex() -> None:
    s = snap(compiled([rule("w", domains=["*.example.com"])]))
    assert chosen(s, facts("example.com")) is None
    assert chosen(s, facts("a.b.example.com")) == "w"
    assert chosen(s, facts("badexample.com")) is None


def test_rollout_disabled_is_skipped() -> None:
    rules = [
        rule("off", domains=["api.example.com"], rollout="disabled"),
        rule("on", domains=["api.example.com"]),
    ]
    p = compiled(rules)
    assert chosen(snap(p), facts()) == "on"
    assert chosen(snap(compiled(rules[:1])), facts()) is None
    assert p.rule_count == 2
    assert [r.name for r in p.requests.lookup("api.example.com")] == ["on"]


def test_injected_headers_are_secrets() -> None:
    d = decide_request(snap(compiled([rule("a")])), DEFAULT_SANDBOX, facts(), NOW)
    assert d.decision == "injected"
    assert d.resolution is not None
    assert (d.resolution.rule, d.resolution.binding, d.resolution.source) == ("a", "hdr", "tok")
    assert d.resolution.reason is None
    assert d.resolution.source_at_version == "tok@1"
    [(name, value)] = d.headers
    assert name == "Authorization"
    assert isinstance(value, Secret)
    assert value.reveal() == f"Bearer {TOKEN}"
    for shown in (repr(value), str(value), f"{value}", repr(d), str(d.headers)):
        assert TOKEN not in shown
    assert str(value) == MASK


def test_basic_auth_renders_base64_user_colon_password() -> None:
    d = decide_request(snap(compiled([rule("b", "basic")])), DEFAULT_SANDBOX, facts(), NOW)
    assert d.decision == "injected"
    [(name, value)] = d.headers
    assert name == "Authorization"
    assert value.reveal() == "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    assert "alice" not in repr(d)


def test_template_over_username_password_source() -> None:
    bindings = [
        {
            "ref": "hdr",
            "sourceRef": "up",
            "projection": {
                "type": "http_headers",
                "httpHeaders": {
                    "headers": [
                        {"name": "X-User", "valueTemplate": "{{ .username }}"},
                        {"name": "X-Pass", "valueTemplate": "{{password}}"},
                    ]
                },
            },
        }
    ]
    d = decide_request(
        snap(compiled([rule("a")], bindings=bindings), up_entry("bob", "pw")),
        DEFAULT_SANDBOX,
        facts(),
        NOW,
    )
    assert [(n, v.reveal()) for n, v in d.headers] == [("X-User", "bob"), ("X-Pass", "pw")]


@pytest.mark.parametrize("fail_open", [False, True])
@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (None, "missing"),
        (headers_entry(expires_at=NOW), "expired"),
        (headers_entry(expires_at=NOW - 1), "expired"),
        (SourceEntry("tok", 2, "static_headers", None), "expired"),  # purged material
        (headers_entry({"other": "x"}), "render"),  # the key is missing at render time
        (headers_entry({"token": "a\r\nX-Evil: 1"}), "render"),
        (headers_entry({"token": "a\0b"}), "render"),
    ],
)
def test_failure_policy(entry: SourceEntry | None, reason: str, fail_open: bool) -> None:
    policy = "fail-open" if fail_open else "fail-closed"
    p = compiled([rule("a", failurePolicy=policy)])
    s = Snapshot(policies={DEFAULT_SANDBOX: p}, sources={"tok": entry} if entry else {})
    d = decide_request(s, DEFAULT_SANDBOX, facts(), NOW)
    assert d.decision == ("failed-open" if fail_open else "failed-closed")
    assert d.headers == ()  # fail-open forwards unchanged
    assert d.resolution is not None
    assert d.resolution.reason == reason
    assert d.resolution.fail_open is fail_open
    assert d.resolution.version == (entry.version if entry else None)
    if entry is None:
        assert d.resolution.source_at_version == "tok"


def test_not_yet_expired_injects() -> None:
    s = snap(compiled([rule("a")]), headers_entry(expires_at=NOW + 1))
    assert decide_request(s, DEFAULT_SANDBOX, facts(), NOW).decision == "injected"


def test_trace_never_injects() -> None:
    s = snap(compiled([rule("a"), rule("t", httpMatch={"methods": ["TRACE"]})]))
    d = decide_request(s, DEFAULT_SANDBOX, facts(method="TRACE"), NOW)
    assert d.decision == "passed"
    assert d.headers == ()


def test_unknown_sandbox_passes() -> None:
    d = decide_request(snap(compiled([rule("a")])), "someone-else", facts(), NOW)
    assert d.decision == "passed"


# --- protocol and ports ------------------------------------------------------------------------


def test_https_defaults_to_port_443() -> None:
    s = snap(compiled([rule("a")]))
    assert chosen(s, facts(port=443)) == "a"
    assert chosen(s, facts(port=8443)) is None
    assert chosen(s, facts(scheme="http", port=443)) is None


def test_http_defaults_to_port_80() -> None:
    s = snap(compiled([rule("a", protocol="http")]))
    assert chosen(s, facts(scheme="http")) == "a"
    assert chosen(s, facts(scheme="http", port=8080)) is None
    assert chosen(s, facts(scheme="https", port=80)) is None
    assert chosen(s, facts(scheme="https")) is None


def test_port_ranges() -> None:
    s = snap(compiled([rule("a", ports=[{"port": 8000, "endPort": 8010}, {"port": 9000}])]))
    for port, hit in [
        (7999, False),
        (8000, True),
        (8005, True),
        (8010, True),
        (8011, False),
        (9000, True),
        (9001, False),
        (443, False),
    ]:
        assert (chosen(s, facts(port=port)) == "a") is hit, port


# --- httpMatch ---------------------------------------------------------------------------------


def test_methods() -> None:
    s = snap(compiled([rule("a", httpMatch={"methods": ["GET", "HEAD"]})]))
    assert chosen(s, facts(method="GET")) == "a"
    assert chosen(s, facts(method="HEAD")) == "a"
    assert chosen(s, facts(method="POST")) is None


def test_paths_and_prefixes() -> None:
    s = snap(
        compiled([rule("a", httpMatch={"paths": ["/exact"], "pathPrefixes": ["/v2/", "/api"]})])
    )
    assert chosen(s, facts(path="/exact")) == "a"
    assert chosen(s, facts(path="/exact/")) is None
    assert chosen(s, facts(path="/exac")) is None
    assert chosen(s, facts(path="/v2/")) == "a"
    assert chosen(s, facts(path="/v2/library/x")) == "a"
    assert chosen(s, facts(path="/v2")) is None
    # A plain string prefix, not a segment prefix.
    assert chosen(s, facts(path="/apix")) == "a"
    assert chosen(s, facts(path="/")) is None


def test_query_conditions() -> None:
    m = {"query": [{"name": "tenant", "values": ["a", "b"]}, {"name": "debug", "present": False}]}
    s = snap(compiled([rule("q", httpMatch=m)]))
    assert chosen(s, facts(query="tenant=a")) == "q"
    assert chosen(s, facts(query="x=1&tenant=b")) == "q"
    assert chosen(s, facts(query="tenant=A")) is None  # values are case-sensitive
    assert chosen(s, facts(query="Tenant=a")) is None  # so are query names
    assert chosen(s, facts(query="tenant=c")) is None
    assert chosen(s, facts(query="tenant=c&tenant=a")) == "q"  # any value matches
    assert chosen(s, facts(query="")) is None
    assert chosen(s, facts(query="tenant=a&debug=1")) is None
    assert chosen(s, facts(query="tenant=a&debug")) is None  # present, even with no value


def test_query_present_without_values() -> None:
    s = snap(compiled([rule("q", httpMatch={"query": [{"name": "sig"}]})]))
    assert chosen(s, facts(query="sig=")) == "q"
    assert chosen(s, facts(query="sig=anything")) == "q"
    assert chosen(s, facts(query="other=1")) is None


def test_header_conditions() -> None:
    m = {
        "headers": [
            {"name": "X-Tenant", "values": ["Acme"]},
            {"name": "Authorization", "present": False},
            {"name": "X-Need"},
        ]
    }
    s = snap(compiled([rule("h", httpMatch=m)]))
    ok = {"x-tenant": ["Acme"], "x-need": [""]}
    assert chosen(s, facts(headers=ok)) == "h"
    assert chosen(s, facts(headers={**ok, "x-tenant": ["acme"]})) is None  # values exact
    assert chosen(s, facts(headers={**ok, "x-tenant": ["x", "Acme"]})) == "h"
    assert chosen(s, facts(headers={**ok, "authorization": ["Bearer x"]})) is None
    assert chosen(s, facts(headers={"x-tenant": ["Acme"]})) is None
    assert chosen(s, facts(headers=None)) is None


def test_all_fields_must_match() -> None:
    m = {"methods": ["POST"], "pathPrefixes": ["/upload"], "query": [{"name": "k"}]}
    s = snap(compiled([rule("all", httpMatch=m)]))
    assert chosen(s, facts(method="POST", path="/upload/1", query="k=1")) == "all"
    assert chosen(s, facts(method="GET", path="/upload/1", query="k=1")) is None
    assert chosen(s, facts(method="POST", path="/down", query="k=1")) is None
    assert chosen(s, facts(method="POST", path="/upload/1")) is None


def test_parse_query() -> None:
    assert parse_query("a=1&b=%2F&c&&d=x+y&e=%3D=") == (
        ("a", "1"),
        ("b", "/"),
        ("c", ""),
        ("d", "x+y"),
        ("e", "=="),
    )
    assert parse_query("") == ()


# --- traffic rules -----------------------------------------------------------------------------


def test_traffic_first_match_and_mode() -> None:
    traffic = [
        {"name": "deny-admin", "action": "deny", "domains": ["admin.example.com"]},
        {"name": "allow-example", "action": "allow", "domains": ["*.example.com"]},
        {"name": "deny-meta", "action": "deny", "cidrs": ["169.254.0.0/16"]},
        {
            "name": "allow-high",
            "action": "allow",
            "domains": ["api.other.test"],
            "ports": [{"port": 8000, "endPort": 8999}],
        },
    ]
    for mode, default in (("block-all", False), ("allow-all", True)):
        p = compiled([], traffic=traffic, mode=mode)
        d = check_traffic(p, "admin.example.com", 443, "10.0.0.1")
        assert (d.allowed, d.rule) == (False, "deny-admin")
        d = check_traffic(p, "www.example.com", 443, "169.254.169.254")
        assert (d.allowed, d.rule) == (True, "allow-example")  # first match wins
        d = check_traffic(p, "x.test", 80, "169.254.169.254")
        assert (d.allowed, d.rule) == (False, "deny-meta")
        d = check_traffic(p, "api.other.test", 8500, None)
        assert (d.allowed, d.rule) == (True, "allow-high")
        d = check_traffic(p, "api.other.test", 9000, None)
        assert (d.allowed, d.rule, d.mode) == (default, None, mode)


def test_cidr_rule_never_matches_without_an_address() -> None:
    p = compiled([], traffic=[{"name": "net", "action": "deny", "cidrs": ["0.0.0.0/0", "::/0"]}])
    assert check_traffic(p, "a.test", 443, None).rule is None
    assert check_traffic(p, "a.test", 443, "192.0.2.1").rule == "net"
    assert check_traffic(p, "a.test", 443, "2001:db8::1").rule == "net"


def test_cidr_and_domain_must_both_match() -> None:
    rule_ = {"name": "r", "action": "allow", "domains": ["a.test"], "cidrs": ["10.0.0.0/8"]}
    p = compiled([], traffic=[rule_], mode="block-all")
    assert check_traffic(p, "a.test", 443, "10.1.2.3").allowed
    assert not check_traffic(p, "a.test", 443, "11.1.2.3").allowed
    assert not check_traffic(p, "b.test", 443, "10.1.2.3").allowed


# --- mTLS selection ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_entry(tmp_path_factory: pytest.TempPathFactory) -> SourceEntry:
    pki = TestPKI.create(tmp_path_factory.mktemp("pki"))
    issued = pki.client("match-client")
    tls = load_tls_material(issued.chain_pem.decode(), issued.key_pem.decode(), None)
    return SourceEntry("cert", 3, "static_tls_client_certificate", Material(tls=tls))


def test_tls_and_header_rules_on_one_host(cert_entry: SourceEntry) -> None:
    rules = [
        rule("cert", "mtls", domains=["api.example.com"]),
        rule("hdr", domains=["api.example.com"]),
    ]
    p = compiled(rules)
    s = snap(p, headers_entry(), cert_entry)
    sel = select_tls(s, DEFAULT_SANDBOX, "api.example.com", 443, NOW)
    assert sel is not None
    assert cert_entry.material is not None
    assert sel.material is cert_entry.material.tls
    assert (sel.resolution.rule, sel.resolution.reason) == ("cert", None)
    assert sel.resolution.source_at_version == "cert@3"
    # The mTLS rule comes first in the list but is not a request rule: the header rule applies.
    assert chosen(s, facts()) == "hdr"
    assert [r.name for r in p.tls.lookup("api.example.com")] == ["cert"]
    assert [r.name for r in p.requests.lookup("api.example.com")] == ["hdr"]


def test_select_tls_by_host_and_port_only(cert_entry: SourceEntry) -> None:
    s = snap(
        compiled([rule("cert", "mtls", domains=["*.example.com"], ports=[{"port": 8443}])]),
        cert_entry,
    )
    assert select_tls(s, DEFAULT_SANDBOX, "a.example.com", 8443, NOW) is not None
    assert select_tls(s, DEFAULT_SANDBOX, "a.example.com", 443, NOW) is None
    assert select_tls(s, DEFAULT_SANDBOX, "example.com", 8443, NOW) is None
    assert select_tls(s, "nobody", "a.example.com", 8443, NOW) is None


def test_select_tls_unresolvable(cert_entry: SourceEntry) -> None:
    p = compiled([rule("cert", "mtls", failurePolicy="fail-open")])
    sel = select_tls(snap(p, headers_entry()), DEFAULT_SANDBOX, "h.test", 443, NOW)
    assert sel is not None
    assert (sel.material, sel.resolution.reason, sel.resolution.fail_open) == (
        None,
        "missing",
        True,
    )
    # A source of the wrong kind (no TLS material) cannot render.
    wrong = SourceEntry("cert", 1, "static_headers", Material(values={"t": Secret("x")}))
    sel = select_tls(snap(p, wrong), DEFAULT_SANDBOX, "h.test", 443, NOW)
    assert sel is not None
    assert (sel.material, sel.resolution.reason) == (None, "render")
    expired = SourceEntry("cert", 1, cert_entry.kind, cert_entry.material, expires_at=NOW)
    sel = select_tls(snap(p, expired), DEFAULT_SANDBOX, "h.test", 443, NOW)
    assert sel is not None
    assert (sel.material, sel.resolution.reason) == (None, "expired")


def test_could_match() -> None:
    p = compiled(
        [
            rule("cert", "mtls", domains=["mtls.test"]),
            rule("hdr", domains=["*.example.com"], ports=[{"port": 8443}]),
            rule("plain", protocol="http", domains=["plain.test"]),
        ]
    )
    assert could_match(p, "mtls.test", 443)
    assert not could_match(p, "mtls.test", 8443)
    assert could_match(p, "a.example.com", 8443)
    assert not could_match(p, "a.example.com", 443)
    assert not could_match(p, "plain.test", 80)
    assert not could_match(p, "elsewhere.test", 443)


# --- build_snapshot ----------------------------------------------------------------------------


def test_build_snapshot_from_config() -> None:
    config = ConfigFile.model_validate(
        {
            "sources": [
                {
                    "name": "tok",
                    "resolverKind": "static_headers",
                    "spec": {"staticHeaders": {"values": {"token": TOKEN}}},
                    "expiresAt": "2100-01-01T00:00:00Z",
                }
            ],
            "templates": [
                {
                    "name": "default",
                    "spec": {
                        "network": {
                            "egress": {"credentialRules": [rule("a")]},
                            "credentialBindings": BINDINGS[:1],
                        }
                    },
                }
            ],
        }
    )
    versioned = {"tok": Versioned(config.sources[0], 4)}
    s = build_snapshot(config, versioned)
    d = decide_request(s, DEFAULT_SANDBOX, facts(), NOW)
    assert d.decision == "injected"
    assert d.headers[0][1].reveal() == f"Bearer {TOKEN}"
    assert d.resolution is not None
    assert d.resolution.source_at_version == "tok@4"
    assert s.sources["tok"].expires_at == 4102444800.0
    # An unchanged version keeps its entry (and material) object across rebuilds.
    again = build_snapshot(config, versioned, s)
    assert again.sources["tok"] is s.sources["tok"]
    assert again.generation > s.generation
    bumped = build_snapshot(config, {"tok": Versioned(config.sources[0], 5)}, s)
    assert bumped.sources["tok"] is not s.sources["tok"]


def test_build_snapshot_without_templates_injects_nothing() -> None:
    s = build_snapshot(ConfigFile(), {})
    assert decide_request(s, DEFAULT_SANDBOX, facts(), NOW).decision == "passed"
    assert check_traffic(s.policies[DEFAULT_SANDBOX], "a.test", 443, None).allowed


# --- lookup cost does not grow with rule count -------------------------------------------------


def test_lookup_returns_only_the_hosts_candidates() -> None:
    others = [
        rule(f"r{i}", domains=[f"h{i}.other.test", f"*.h{i}.other.test"]) for i in range(10_000)
    ]
    mine = [
        rule("exact", domains=["api.example.com"]),
        rule("wild", domains=["*.example.com"]),
        rule("deep", domains=["*.api.example.com"]),
    ]
    p = compiled([*others[:5000], *mine, *others[5000:]])
    assert len(p.requests) == 10_003
    assert [r.name for r in p.requests.lookup("api.example.com")] == ["exact", "wild"]
    assert [r.name for r in p.requests.lookup("x.api.example.com")] == ["wild", "deep"]
    assert [r.name for r in p.requests.lookup("h77.other.test")] == ["r77"]
    assert p.requests.lookup("nowhere.test") == []


# --- property: decide_request agrees with a brute-force matcher ---------------------------------

HOSTS = ["a.example.com", "b.example.com", "x.a.example.com", "example.com", "other.test"]
PATTERNS = [
    "a.example.com",
    "b.example.com",
    "*.example.com",
    "*.a.example.com",
    "example.com",
    "other.test",
]
PORTS = [{"port": 443}, {"port": 80}, {"port": 8443}, {"port": 8000, "endPort": 8010}]

http_matches = st.fixed_dictionaries(
    {},
    optional={
        "methods": st.lists(st.sampled_from(["GET", "POST"]), max_size=2, unique=True),
        "paths": st.lists(st.sampled_from(["/a", "/b/c"]), max_size=2, unique=True),
        "pathPrefixes": st.lists(st.sampled_from(["/a", "/b/"]), max_size=2, unique=True),
        "headers": st.lists(
            st.sampled_from(
                [
                    {"name": "X-T", "values": ["1"]},
                    {"name": "x-t", "present": False},
                    {"name": "X-T"},
                ]
            ),
            max_size=1,
        ),
        "query": st.lists(
            st.sampled_from([{"name": "q", "values": ["1", "2"]}, {"name": "q", "present": False}]),
            max_size=1,
        ),
    },
)
rule_bodies = st.fixed_dictionaries(
    {},
    optional={
        "domains": st.lists(st.sampled_from(PATTERNS), max_size=2, unique=True),
        "ports": st.lists(st.sampled_from(PORTS), max_size=2),
        "protocol": st.sampled_from(["https", "http"]),
        "rollout": st.sampled_from(["enabled", "disabled"]),
        "httpMatch": http_matches,
    },
)
facts_strategy = st.builds(
    RequestFacts,
    scheme=st.sampled_from(["https", "http"]),
    host=st.sampled_from(HOSTS),
    port=st.sampled_from([80, 443, 8005, 8443, 9000]),
    method=st.sampled_from(["GET", "POST", "TRACE"]),
    path=st.sampled_from(["/", "/a", "/a/b", "/b/c", "/b/"]),
    query=st.sampled_from([(), (("q", "1"),), (("q", "3"),)]),
    headers=st.sampled_from([None, {"x-t": ["1"]}, {"x-t": ["2"]}]),
)


def _ref_domain(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def _ref_values(cond: dict[str, Any], found: list[str]) -> bool:
    if cond.get("present", True) is False:
        return not found
    if cond.get("values"):
        return any(v in cond["values"] for v in found)
    return bool(found)


def reference_choice(rules: list[dict[str, Any]], f: RequestFacts) -> str | None:
    """Walk the whole list, spelling out SPEC section 3 directly."""
    if f.method == "TRACE":
        return None
    for r in rules:
        if r.get("rollout") == "disabled":
            continue
        if r.get("domains") and not any(_ref_domain(d, f.host) for d in r["domains"]):
            continue
        proto = r.get("protocol", "https")
        if f.scheme != proto:
            continue
        ports = r.get("ports") or [{"port": 443 if proto == "https" else 80}]
        if not any(p["port"] <= f.port <= p.get("endPort", p["port"]) for p in ports):
            continue
        m = r.get("httpMatch", {})
        if m.get("methods") and f.method not in m["methods"]:
            continue
        paths, prefixes = m.get("paths", []), m.get("pathPrefixes", [])
        if (paths or prefixes) and not (
            f.path in paths or any(f.path.startswith(p) for p in prefixes)
        ):
            continue
        hdrs = {k.lower(): v for k, v in (f.headers or {}).items()}
        if not all(
            _ref_values(c, list(hdrs.get(c["name"].lower(), []))) for c in m.get("headers", [])
        ):
            continue
        if not all(
            _ref_values(c, [v for k, v in f.query if k == c["name"]]) for c in m.get("query", [])
        ):
            continue
        return str(r["name"])
    return None


@settings(max_examples=300, deadline=None)
@given(bodies=st.lists(rule_bodies, max_size=6), f=facts_strategy)
def test_decide_request_matches_brute_force(bodies: list[dict[str, Any]], f: RequestFacts) -> None:
    rules = [rule(f"r{i}", **body) for i, body in enumerate(bodies)]
    d = decide_request(snap(compiled(rules)), DEFAULT_SANDBOX, f, NOW)
    expected = reference_choice(rules, f)
    assert (d.resolution.rule if d.resolution else None) == expected
    assert d.decision == ("injected" if expected else "passed")


def test_compile_refuses_a_dangling_rule() -> None:
    with pytest.raises(ValueError, match="no binding"):
        compiled([rule("a", "nothing")])
