"""The live Snapshot holder: builds a new snapshot on every change and swaps it in at once.

Inputs: the config file (declared sources, templates, static sandboxes) and what the admin
API created (sources, templates, sandboxes). A request reads `snapshot` once at its start,
so it sees exactly one version of all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .model.config import ConfigFile
from .model.policy import SandboxNetworkPolicy, Template
from .model.sandboxes import NetworkOverrides
from .model.sources import CredentialSource
from .policy.compile import (
    CompiledPolicy,
    Snapshot,
    SourceEntry,
    compile_policy,
    next_generation,
)
from .policy.effective import effective_policy
from .policy.validate import KnownSource, SourceLike
from .proxy.identity import DEFAULT_SANDBOX, token_hash
from .secrets.material import material_of

__all__ = ["DEFAULT_SANDBOX", "LiveState", "SandboxSpec", "Versioned", "build_snapshot"]


@dataclass(frozen=True)
class Versioned:
    source: CredentialSource
    version: int


@dataclass(frozen=True)
class SandboxSpec:
    """A sandbox as the proxy needs it: its template, its overrides, its token's hash."""

    id: str
    template: str
    network: NetworkOverrides | None
    token_hash: bytes
    origin: str = "api"  # or "config"


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
    """Compile the config's default policy and merge declared and API-created sources.

    (LiveState adds sandboxes on top; this is the config-only view `check` and tests use.)
    """
    return Snapshot(
        policies={DEFAULT_SANDBOX: compile_policy(default_policy(config))},
        sources=_merge_sources(sources, previous, api_sources),
    )


def _merge_sources(
    sources: dict[str, Versioned],
    previous: Snapshot | None,
    api_sources: Mapping[str, SourceEntry] | None,
) -> dict[str, SourceEntry]:
    old = previous.sources if previous else {}

    def entry(v: Versioned) -> SourceEntry:
        # Reuse an unchanged version's entry: its material (and the TLS context cached on
        # it) stays the same object across reloads.
        prev = old.get(v.source.name)
        return prev if prev is not None and prev.version == v.version else _entry(v)

    # A declared source shadows an API one of the same name (the API refuses to create one).
    merged = dict(api_sources or {})
    merged.update({name: entry(v) for name, v in sources.items()})
    return merged


class LiveState:
    """Holds the current snapshot; every change builds the next one fully, then swaps it in."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = Snapshot(policies={}, sources={})
        self.config: ConfigFile | None = None
        self.listen_loopback = True  # decides sandboxAuth's default
        self._sources: dict[str, Versioned] = {}
        self._api_sources: dict[str, SourceEntry] = {}
        self._api_templates: dict[str, Template] = {}
        self._api_sandboxes: dict[str, SandboxSpec] = {}
        # sandbox id -> (template, overrides, compiled): recompile only what changed.
        self._compiled: dict[str, tuple[Template | None, NetworkOverrides | None, CompiledPolicy]]
        self._compiled = {}
        self.listeners: list[Callable[[Snapshot], None]] = []

    # ---- views ------------------------------------------------------------------------------

    @property
    def declared_sources(self) -> frozenset[str]:
        return frozenset(self._sources)

    @property
    def auth_required(self) -> bool:
        mode = self.config.proxy.sandbox_auth if self.config else None
        return mode == "required" if mode else not self.listen_loopback

    def templates(self) -> dict[str, Template]:
        """Every template by name; the config's first (the API cannot shadow them)."""
        out = dict(self._api_templates)
        out.update({t.name: t for t in (self.config.templates if self.config else [])})
        return out

    def declared_templates(self) -> frozenset[str]:
        return frozenset(t.name for t in (self.config.templates if self.config else []))

    def sandboxes(self) -> dict[str, SandboxSpec]:
        out = dict(self._api_sandboxes)
        for sb in self.config.sandboxes if self.config else []:
            out[sb.id] = SandboxSpec(
                sb.id, sb.template, sb.network, token_hash(sb.token.get_secret_value()), "config"
            )
        return out

    def known_sources(self) -> dict[str, SourceLike]:
        """Every source a binding may name, as binding checks need it (no secret values)."""
        out: dict[str, SourceLike] = {}
        for name, e in self._api_sources.items():
            keys: frozenset[str] | None = None
            if e.material is not None:
                keys = frozenset(e.material.values)
            out[name] = KnownSource(name, e.kind, keys)
        out.update({name: v.source for name, v in self._sources.items()})
        return out

    def effective(self, sandbox: SandboxSpec) -> SandboxNetworkPolicy | None:
        template = self.templates().get(sandbox.template)
        if template is None:
            return None
        return effective_policy(template.spec.network, sandbox.network)

    # ---- changes ----------------------------------------------------------------------------

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
        previous_config = self.config
        self.config = config
        try:
            # May raise: then nothing is swapped and the running policy stays.
            snapshot = self._build(_merge_sources(sources, self.snapshot, self._api_sources))
        except Exception:
            self.config = previous_config
            raise
        self._sources = sources
        return self._swap(snapshot)

    def set_api_sources(self, entries: Mapping[str, SourceEntry]) -> Snapshot:
        """Swap in the API-created sources; policies are reused, they do not depend on them."""
        self._api_sources = dict(entries)
        merged = _merge_sources(self._sources, self.snapshot, self._api_sources)
        snapshot = dataclasses.replace(self.snapshot, sources=merged, generation=next_generation())
        return self._swap(snapshot)

    def put_api_source(self, entry: SourceEntry) -> Snapshot:
        return self.set_api_sources({**self._api_sources, entry.name: entry})

    def remove_api_source(self, name: str) -> Snapshot:
        return self.set_api_sources({n: e for n, e in self._api_sources.items() if n != name})

    def set_api_policy(
        self, templates: Mapping[str, Template], sandboxes: Mapping[str, SandboxSpec]
    ) -> Snapshot:
        """Swap in the API's templates and sandboxes (all of them, as stored)."""
        old_t, old_s = self._api_templates, self._api_sandboxes
        self._api_templates, self._api_sandboxes = dict(templates), dict(sandboxes)
        try:
            snapshot = self._build(self.snapshot.sources)
        except Exception:
            self._api_templates, self._api_sandboxes = old_t, old_s
            raise
        return self._swap(snapshot)

    # ---- building ---------------------------------------------------------------------------

    def _compile(
        self, key: str, template: Template | None, ov: NetworkOverrides | None
    ) -> CompiledPolicy:
        cached = self._compiled.get(key)
        if cached is not None and cached[0] is template and cached[1] is ov:
            return cached[2]
        network = template.spec.network if template else SandboxNetworkPolicy()
        compiled = compile_policy(effective_policy(network, ov))
        self._compiled[key] = (template, ov, compiled)
        return compiled

    def _build(self, sources: Mapping[str, SourceEntry]) -> Snapshot:
        assert self.config is not None
        config = self.config
        templates = self.templates()
        default_t = templates.get(config.proxy.default_template)
        policies: dict[str, CompiledPolicy] = {
            DEFAULT_SANDBOX: self._compile(f"\0{DEFAULT_SANDBOX}", default_t, None)
        }
        identities: dict[str, bytes] = {}
        sandboxes = self.sandboxes()
        for sb in sandboxes.values():
            template = templates.get(sb.template)
            if template is None:
                continue  # no policy: every request of it is refused
            policies[sb.id] = self._compile(sb.id, template, sb.network)
            identities[sb.id] = sb.token_hash
        for gone in set(self._compiled) - set(sandboxes) - {f"\0{DEFAULT_SANDBOX}"}:
            del self._compiled[gone]
        return Snapshot(
            policies=policies,
            sources=dict(sources),
            identities=identities,
            auth_required=self.auth_required,
        )

    def _swap(self, snapshot: Snapshot) -> Snapshot:
        self.snapshot = snapshot
        for listener in self.listeners:
            listener(snapshot)
        return snapshot
