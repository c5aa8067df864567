"""The live Snapshot holder: builds a new snapshot on every change and swaps it in at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .model.config import ConfigFile
from .model.policy import SandboxNetworkPolicy
from .model.sources import CredentialSource
from .policy.compile import Snapshot, SourceEntry, compile_policy
from .secrets.material import material_of

DEFAULT_SANDBOX = "default"


@dataclass(frozen=True)
class Versioned:
    source: CredentialSource
    version: int


def _entry(v: Versioned) -> SourceEntry:
    s = v.source
    return SourceEntry(
        name=s.name,
        version=v.version,
        kind=s.resolver_kind,
        material=material_of(s),
        expires_at=s.expires_at.timestamp() if s.expires_at else None,
    )


def default_policy(config: ConfigFile) -> SandboxNetworkPolicy:
    for t in config.templates:
        if t.name == config.proxy.default_template:
            return t.spec.network
    # No templates at all: the embedded default lets traffic through and injects nothing.
    return SandboxNetworkPolicy()


def build_snapshot(
    config: ConfigFile, sources: dict[str, Versioned], previous: Snapshot | None = None
) -> Snapshot:
    old = previous.sources if previous else {}

    def entry(v: Versioned) -> SourceEntry:
        # Reuse an unchanged version's entry: its material (and the TLS context cached on
        # it) stays the same object across reloads.
        prev = old.get(v.source.name)
        return prev if prev is not None and prev.version == v.version else _entry(v)

    return Snapshot(
        policies={DEFAULT_SANDBOX: compile_policy(default_policy(config))},
        sources={name: entry(v) for name, v in sources.items()},
    )


class LiveState:
    """Holds the current snapshot; `apply` builds the next one fully before swapping it in.

    A request reads `snapshot` once at its start, so it sees exactly one version.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot = Snapshot(policies={}, sources={})
        self.config: ConfigFile | None = None
        self._sources: dict[str, Versioned] = {}
        self.listeners: list[Callable[[Snapshot], None]] = []

    def apply(self, config: ConfigFile) -> Snapshot:
        # A declared source is version 1, and gains a version on each reload that changes it.
        sources: dict[str, Versioned] = {}
        for s in config.sources:
            old = self._sources.get(s.name)
            if old is None:
                sources[s.name] = Versioned(s, 1)
            elif old.source == s:
                sources[s.name] = old
            else:
                sources[s.name] = Versioned(s, old.version + 1)
        snapshot = build_snapshot(
            config, sources, self.snapshot
        )  # may raise: nothing is swapped then
        self._sources, self.config, self.snapshot = sources, config, snapshot
        for listener in self.listeners:
            listener(snapshot)
        return snapshot
