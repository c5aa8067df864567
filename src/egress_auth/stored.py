"""What the store holds, turned into LiveState's inputs, reusing every object that did not change.

Both the admin API's process (after each write) and every extra proxy worker (on each sync)
read the whole store this way. Reuse is what keeps that cheap: an unchanged source keeps its
decrypted material (and the TLS context cached on it) without being opened again, and an
unchanged sandbox keeps its `SandboxSpec` object, so LiveState's per-sandbox compile cache,
which compares by identity, recompiles only the sandboxes that changed.
"""

from __future__ import annotations

import json
from datetime import datetime

from .model.policy import Template
from .model.sandboxes import NetworkOverrides
from .model.sources import CredentialSource
from .policy.compile import SourceEntry
from .secrets.material import Material, material_of
from .secrets.policy_rows import SandboxRow
from .secrets.store import SourceRow, Store
from .state import LiveState, SandboxSpec

# What identifies one stored state of a row: a source deleted and created again restarts at
# version 1, so the version alone is not enough; `updated_at` changes on every write.
_SourceKey = tuple[int, datetime, bool]
_SandboxKey = tuple[str, str | None, bytes]


def source_entry(row: SourceRow, material: Material | None) -> SourceEntry:
    return SourceEntry(
        name=row.name,
        version=row.version,
        kind=row.resolver_kind,
        material=material,
        expires_at=row.expires_at.timestamp() if row.expires_at else None,
    )


class StoredState:
    def __init__(self, store: Store, state: LiveState) -> None:
        self.store = store
        self.state = state
        self._sources: dict[str, tuple[_SourceKey, SourceEntry]] = {}
        self._templates: dict[str, tuple[str, Template]] = {}
        self._sandboxes: dict[str, tuple[_SandboxKey, SandboxSpec]] = {}

    # ---- sources ----------------------------------------------------------------------------

    def source_entries(self) -> dict[str, SourceEntry]:
        out: dict[str, SourceEntry] = {}
        for row in self.store.list_sources():
            key = (row.version, row.updated_at, row.has_material)
            cached = self._sources.get(row.name)
            if cached is not None and cached[0] == key:
                out[row.name] = cached[1]
                continue
            entry = source_entry(row, self._material(row))
            self._sources[row.name] = (key, entry)
            out[row.name] = entry
        for gone in set(self._sources) - set(out):
            del self._sources[gone]
        return out

    def _material(self, row: SourceRow) -> Material | None:
        if not row.has_material:
            return None
        found = self.store.read_spec(row.name)
        if found is None:  # purged between the listing and this read
            return None
        _, spec = found
        source = CredentialSource.model_validate(
            {"name": row.name, "resolverKind": row.resolver_kind, "spec": json.loads(spec)}
        )
        return material_of(source)

    def load_sources(self) -> None:
        self.state.set_api_sources(self.source_entries())

    # ---- templates and sandboxes ------------------------------------------------------------

    def policy(self) -> tuple[dict[str, Template], dict[str, SandboxSpec]]:
        templates: dict[str, Template] = {}
        for t in self.store.list_templates():
            cached_t = self._templates.get(t.name)
            if cached_t is None or cached_t[0] != t.body:
                cached_t = (t.body, Template.model_validate_json(t.body))
                self._templates[t.name] = cached_t
            templates[t.name] = cached_t[1]
        sandboxes: dict[str, SandboxSpec] = {}
        for r in self.store.list_sandboxes():
            key = (r.template, r.network, r.token_hash)
            cached_s = self._sandboxes.get(r.id)
            if cached_s is None or cached_s[0] != key:
                cached_s = (key, sandbox_spec(r))
                self._sandboxes[r.id] = cached_s
            sandboxes[r.id] = cached_s[1]
        for gone in set(self._templates) - set(templates):
            del self._templates[gone]
        for gone in set(self._sandboxes) - set(sandboxes):
            del self._sandboxes[gone]
        return templates, sandboxes

    def load_policy(self) -> None:
        self.state.set_api_policy(*self.policy())

    def load(self) -> None:
        """Everything: sources first, so a new sandbox never names a source not yet loaded."""
        self.load_sources()
        self.load_policy()


def sandbox_spec(row: SandboxRow) -> SandboxSpec:
    network = NetworkOverrides.model_validate_json(row.network) if row.network else None
    return SandboxSpec(row.id, row.template, network, row.token_hash, "api")
