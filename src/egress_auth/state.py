"""The live Snapshot holder: builds a new snapshot on every change and swaps it in at once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    config: ConfigFile,
    sources: dict[str, Versioned],
    previous: Snapshot | None = None,
    api_sources: Mapping[str, SourceEntry] | None = None,
) -> Snapshot:
    """Compile the config's policies and merge declared and API-created sources.

    A declared source shadows an API one of the same name (the API refuses to create one).
    """
    old = previous.sources if previous else {}

    def entry(v: Versioned) -> SourceEntry:
        # Reuse an unchanged version's entry: its material (and the TLS context cached on
        # it) stays the same object across reloads.
        prev = old.get(v.source.name)
        return prev if prev is not None and prev.version == v.version else _entry(v)

    merged = dict(api_sources or {})
    merged.update({name: entry(v) for name, v in sources.items()})
    return Snapshot(
        policies={DEFAULT_SANDBOX: compile_policy(default_policy(config))},
        sources=merged,
    )


class LiveState:
    """Holds the current snapshot; `apply` builds the next one fully before swapping it in.

    A request reads `snapshot` once at its start, so it sees exactly one version.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot = Snapshot(policies={}, sources={})
        self.config: ConfigFile | None = None
        self._sources: dict[str, Versioned] = {}
        self._api_sources: dict[str, SourceEntry] = {}
        self.listeners: list[Callable[[Snapshot], None]] = []

    @property
    def declared_sources(self) -> frozenset[str]:
        return frozenset(self._sources)

    def set_api_sources(self, entries: Mapping[str, SourceEntry]) -> Snapshot:
        """Swap in the API-created sources; policies are reused, they do not depend on them."""
        api = dict(entries)
        merged = dict(api)
        merged.update({n: e for n, e in self.snapshot.sources.items() if n in self._sources})
        return self._swap(Snapshot(policies=self.snapshot.policies, sources=merged), api=api)

    def put_api_source(self, entry: SourceEntry) -> Snapshot:
        return self.set_api_sources({**self._api_sources, entry.name: entry})

    def remove_api_source(self, name: str) -> Snapshot:
        return self.set_api_sources({n: e for n, e in self._api_sources.items() if n != name})

    def _swap(self, snapshot: Snapshot, api: dict[str, SourceEntry] | None = None) -> Snapshot:
        if api is not None:
            self._api_sources = api
        self.snapshot = snapshot
        for listener in self.listeners:
            listener(snapshot)
        return snapshot

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
        # May raise: then nothing is swapped and the running policy stays.
        snapshot = build_snapshot(config, sources, self.snapshot, self._api_sources)
        self._sources, self.config = sources, config
        return self._swap(snapshot)
