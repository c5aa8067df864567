"""Template + sandbox overrides -> one effective SandboxNetworkPolicy (SPEC section 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ..model.policy import Egress, SandboxNetworkPolicy
from ..model.sandboxes import NetworkOverrides

T = TypeVar("T")


def merge_by_key(base: Sequence[T], over: Sequence[T] | None, key: Callable[[T], str]) -> list[T]:
    """An entry of `over` with the same key replaces the base's in place; the rest append."""
    if not over:
        return list(base)
    replacing = {key(x): x for x in over}
    merged = [replacing.pop(key(x), x) for x in base]
    merged.extend(x for x in over if key(x) in replacing)
    return merged


def effective_policy(
    template: SandboxNetworkPolicy, overrides: NetworkOverrides | None
) -> SandboxNetworkPolicy:
    if overrides is None:
        return template
    egress = overrides.egress or Egress()
    return SandboxNetworkPolicy(
        mode=overrides.mode or template.mode,
        egress=Egress(
            traffic_rules=merge_by_key(
                template.egress.traffic_rules, egress.traffic_rules, lambda r: r.name
            ),
            credential_rules=merge_by_key(
                template.egress.credential_rules,
                egress.credential_rules,
                lambda r: r.name,
            ),
        ),
        credential_bindings=merge_by_key(
            template.credential_bindings, overrides.credential_bindings, lambda b: b.ref
        ),
    )
