"""Template + sandbox overrides -> effective policy (SPEC section 2)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auth.model.policy import SandboxNetworkPolicy
from egress_auth.model.sandboxes import NetworkOverrides
from egress_auth.policy.compile import compile_policy
from egress_auth.policy.effective import effective_policy, merge_by_key


def binding(ref: str, source: str) -> dict[str, Any]:
    return {"ref": ref, "sourceRef": source, "projection": {"type": "username_password"}}


TEMPLATE = SandboxNetworkPolicy.model_validate(
    {
        "mode": "allow-all",
        "egress": {
            "trafficRules": [
                {"name": "t1", "action": "deny", "domains": ["t1.test"]},
                {"name": "t2", "action": "deny", "domains": ["t2.test"]},
            ],
            "credentialRules": [
                {"name": "c1", "credentialRef": "b1", "domains": ["c1.test"]},
                {"name": "c2", "credentialRef": "b2", "domains": ["c2.test"]},
            ],
        },
        "credentialBindings": [binding("b1", "s1"), binding("b2", "s2")],
    }
)


def test_none_overrides_return_the_template() -> None:
    assert effective_policy(TEMPLATE, None) is TEMPLATE


def test_empty_overrides_keep_everything() -> None:
    eff = effective_policy(TEMPLATE, NetworkOverrides())
    assert eff == TEMPLATE


def test_mode_override_only() -> None:
    eff = effective_policy(TEMPLATE, NetworkOverrides(mode="block-all"))
    assert eff.mode == "block-all"
    assert eff.egress == TEMPLATE.egress
    assert eff.credential_bindings == TEMPLATE.credential_bindings


def test_same_name_replaces_in_place_and_others_append() -> None:
    over = NetworkOverrides.model_validate(
        {
            "mode": "block-all",
            "egress": {
                "trafficRules": [
                    {"name": "t3", "action": "allow", "domains": ["t3.test"]},
                    {"name": "t1", "action": "allow", "domains": ["t1.test"]},
                ],
                "credentialRules": [
                    {"name": "c2", "credentialRef": "b3", "domains": ["new.test"]},
                    {"name": "c3", "credentialRef": "b1", "domains": ["c3.test"]},
                ],
            },
            "credentialBindings": [binding("b2", "s2-sandbox"), binding("b3", "s3")],
        }
    )
    eff = effective_policy(TEMPLATE, over)
    assert eff.mode == "block-all"
    traffic = [(r.name, r.action) for r in eff.egress.traffic_rules]
    assert traffic == [("t1", "allow"), ("t2", "deny"), ("t3", "allow")]
    creds = [(r.name, r.credential_ref, r.domains) for r in eff.egress.credential_rules]
    assert creds == [
        ("c1", "b1", ["c1.test"]),
        ("c2", "b3", ["new.test"]),
        ("c3", "b1", ["c3.test"]),
    ]
    bindings = [(b.ref, b.source_ref) for b in eff.credential_bindings]
    assert bindings == [("b1", "s1"), ("b2", "s2-sandbox"), ("b3", "s3")]
    # The template itself is untouched.
    assert [r.action for r in TEMPLATE.egress.traffic_rules] == ["deny", "deny"]
    # The result is a usable policy.
    compiled = compile_policy(eff)
    assert [r.name for r in compiled.requests.lookup("new.test")] == ["c2"]


def test_overrides_with_only_credential_rules_keep_template_traffic() -> None:
    over = NetworkOverrides.model_validate(
        {"egress": {"credentialRules": [{"name": "c9", "credentialRef": "b1"}]}}
    )
    eff = effective_policy(TEMPLATE, over)
    assert eff.mode == "allow-all"
    assert eff.egress.traffic_rules == TEMPLATE.egress.traffic_rules
    assert [r.name for r in eff.egress.credential_rules] == ["c1", "c2", "c9"]
    assert eff.credential_bindings == TEMPLATE.credential_bindings


def test_merge_by_key_basics() -> None:
    def key(s: str) -> str:
        return s[0]

    assert merge_by_key(["a1", "b1"], ["b2", "c2"], key) == ["a1", "b2", "c2"]
    assert merge_by_key(["a1"], None, key) == ["a1"]
    assert merge_by_key(["a1"], [], key) == ["a1"]
    assert merge_by_key([], ["x1", "y1"], key) == ["x1", "y1"]
    base = ["a1"]
    assert merge_by_key(base, None, key) is not base  # a copy, never the caller's list


_items = st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 9)), unique_by=lambda t: t[0])


@settings(max_examples=200, deadline=None)
@given(base=_items, over=_items)
def test_merge_by_key_property(base: list[tuple[str, int]], over: list[tuple[str, int]]) -> None:
    merged = merge_by_key(base, over, lambda t: t[0])
    base_keys = [k for k, _ in base]
    new_keys = [k for k, _ in over if k not in base_keys]
    # Keys: the template's in their order, then the sandbox's new ones in theirs.
    assert [k for k, _ in merged] == base_keys + new_keys
    # Values: the sandbox's entry wins wherever it has one.
    over_map = dict(over)
    assert merged == [(k, over_map.get(k, v)) for k, v in [*base, *((k, 0) for k in new_keys)]]
