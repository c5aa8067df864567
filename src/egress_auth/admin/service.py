"""Credential sources through the API: validate, seal, store, swap the snapshot, answer.

Routes call these methods and nothing else; errors are `ApiError`s that carry a status,
a code and a message built from names and reasons, never from a secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..metrics import METRICS
from ..model.base import NAME_RE
from ..model.sources import (
    CertificateInfo,
    CredentialSource,
    SourceMetadata,
    SourceReplace,
)
from ..policy.compile import SourceEntry
from ..policy.validate import validate_binding, validate_source
from ..secrets.material import Material, MaterialError, material_of
from ..secrets.store import KindChanged, SourceExists, SourceNotFound, SourceRow, Store
from ..state import LiveState
from ..stored import StoredState, source_entry

log = logging.getLogger("egress_auth.admin")


@dataclass
class ApiError(Exception):
    status: int
    code: str
    message: str
    details: Any = None


def _now() -> datetime:
    return datetime.now(UTC)


def _certificate(material: Material | None) -> CertificateInfo | None:
    if material is None or material.tls is None:
        return None
    f = material.tls.facts
    return CertificateInfo(
        subject=f.subject,
        issuer=f.issuer,
        not_after=f.not_after,
        sha256_fingerprint=f.sha256_fingerprint,
    )


def _spec_json(source: CredentialSource) -> bytes:
    # The one place a spec is turned back into plaintext: to be sealed at once.
    return json.dumps(_revealed(source), separators=(",", ":")).encode()


def _revealed(source: CredentialSource) -> dict[str, Any]:
    spec = source.spec
    if spec.static_headers is not None:
        values = {k: v.get_secret_value() for k, v in spec.static_headers.values.items()}
        return {"staticHeaders": {"values": values}}
    if spec.static_username_password is not None:
        up = spec.static_username_password
        return {
            "staticUsernamePassword": {
                "username": up.username.get_secret_value(),
                "password": up.password.get_secret_value(),
            }
        }
    tls = spec.static_tls_client_certificate
    assert tls is not None
    out = {
        "certificatePem": tls.certificate_pem,
        "privateKeyPem": tls.private_key_pem.get_secret_value(),
    }
    if tls.ca_pem is not None:
        out["caPem"] = tls.ca_pem
    return {"staticTLSClientCertificate": out}


@dataclass
class SourceService:
    store: Store
    state: LiveState
    clock: Callable[[], datetime] = _now
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _declared_at: dict[str, tuple[int, datetime, datetime]] = field(default_factory=dict)
    _expiry: asyncio.TimerHandle | None = None

    # ---- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Open every stored source into the snapshot (at start-up, before serving)."""
        self.purge_expired()
        StoredState(self.store, self.state).load_sources()

    @staticmethod
    def _entry(row: SourceRow, material: Material | None) -> SourceEntry:
        return source_entry(row, material)

    # ---- reads ------------------------------------------------------------------------------

    def _status(self, expires_at: datetime | None, has_material: bool) -> str:
        expired = not has_material or (expires_at is not None and expires_at <= self.clock())
        return "expired" if expired else "ready"

    def _metadata(self, row: SourceRow) -> SourceMetadata:
        entry = self.state.snapshot.sources.get(row.name)
        material = entry.material if entry and entry.version == row.version else None
        return SourceMetadata(
            name=row.name,
            resolver_kind=row.resolver_kind,
            current_version=row.version,
            status=self._status(row.expires_at, row.has_material),
            created_at=row.created_at,
            updated_at=row.updated_at,
            expires_at=row.expires_at,
            certificate=_certificate(material),
            origin="api",
        )

    def _declared_metadata(self, name: str) -> SourceMetadata | None:
        config = self.state.config
        entry = self.state.snapshot.sources.get(name)
        if config is None or entry is None or name not in self.state.declared_sources:
            return None
        source = next(s for s in config.sources if s.name == name)
        # Declared sources have no stored history: their times are when this process first
        # saw the version it holds.
        version, created, updated = self._declared_at.get(name, (0, self.clock(), self.clock()))
        if version != entry.version:
            updated = self.clock()
            self._declared_at[name] = (entry.version, created, updated)
        return SourceMetadata(
            name=name,
            resolver_kind=source.resolver_kind,
            current_version=entry.version,
            status=self._status(source.expires_at, entry.material is not None),
            created_at=created,
            updated_at=updated,
            expires_at=source.expires_at,
            certificate=_certificate(entry.material),
            origin="config",
        )

    def list_all(self) -> list[SourceMetadata]:
        out = {row.name: self._metadata(row) for row in self.store.list_sources()}
        for name in self.state.declared_sources:
            meta = self._declared_metadata(name)
            if meta is not None:
                out[name] = meta
        return [out[n] for n in sorted(out)]

    def get(self, name: str) -> SourceMetadata:
        declared = self._declared_metadata(name)
        if declared is not None:
            return declared
        row = self.store.get_source(name)
        if row is None:
            raise self._not_found(name)
        return self._metadata(row)

    @staticmethod
    def _not_found(name: str) -> ApiError:
        return ApiError(404, "not_found", f"credential source {name!r} does not exist")

    # ---- writes -----------------------------------------------------------------------------

    def _refuse_declared(self, name: str) -> None:
        if name in self.state.declared_sources:
            raise ApiError(
                409,
                "read_only",
                f"credential source {name!r} is declared in the config file and is read-only "
                "through the API",
            )

    def _bindings_to(self, name: str) -> Iterator[tuple[str, int, str]]:
        config = self.state.config
        for t in config.templates if config else []:
            for i, b in enumerate(t.spec.network.credential_bindings):
                if b.source_ref == name:
                    yield t.name, i, b.ref

    def _check(self, source: CredentialSource) -> Material:
        """Semantic checks beyond the shape: PEMs, and what the bindings need of this source."""
        problems = [
            {"field": ".".join(str(p) for p in loc), "message": msg}
            for loc, msg in validate_source(source)
        ]
        config = self.state.config
        for t in config.templates if config else []:
            for i, b in enumerate(t.spec.network.credential_bindings):
                if b.source_ref != source.name:
                    continue
                for loc, msg in validate_binding(b, source):
                    where = ".".join(str(p) for p in loc)
                    problems.append(
                        {
                            "field": "resolverKind" if loc[-1] == "type" else "spec",
                            "message": f"template {t.name!r} binding {b.ref!r} "
                            f"(credentialBindings[{i}].{where}): {msg}",
                        }
                    )
        if problems:
            raise ApiError(400, "invalid", problems[0]["message"], problems)
        try:
            return material_of(source)
        except MaterialError as e:
            raise ApiError(
                400, "invalid", str(e), [{"field": e.field, "message": e.reason}]
            ) from None

    async def create(self, source: CredentialSource) -> SourceMetadata:
        self._refuse_declared(source.name)
        material = self._check(source)
        try:
            row = await self._store_write(self.store.create_source, source, material)
        except SourceExists:
            raise ApiError(
                409, "conflict", f"credential source {source.name!r} already exists"
            ) from None
        _count_write("POST")
        return self._metadata(row)

    async def replace(self, name: str, body: SourceReplace) -> SourceMetadata:
        check_body_name(body.name, name)
        if not NAME_RE.match(name) or len(name) > 63:
            raise self._not_found(name)  # no source can have this name
        self._refuse_declared(name)
        source = CredentialSource(
            name=name,
            resolver_kind=body.resolver_kind,
            spec=body.spec,
            expires_at=body.expires_at,
        )
        material = self._check(source)
        try:
            row = await self._store_write(self.store.replace_source, source, material)
        except SourceNotFound:
            raise ApiError(404, "not_found", f"credential source {name!r} does not exist") from None
        except KindChanged:
            raise ApiError(
                400,
                "invalid",
                "resolverKind cannot change on PUT; delete and create instead",
                [{"field": "resolverKind", "message": "cannot change"}],
            ) from None
        _count_write("PUT")
        return self._metadata(row)

    async def _store_write(
        self, write: Callable[..., SourceRow], source: CredentialSource, material: Material
    ) -> SourceRow:
        """Seal and commit off the loop, then swap the snapshot before the caller answers."""
        async with self._lock:
            row = await asyncio.to_thread(
                write,
                source.name,
                source.resolver_kind,
                _spec_json(source),
                expires_at=source.expires_at,
                certificate=_cert_json(material),
                now=self.clock(),
            )
            # The next request sees this version: the snapshot is swapped before the answer.
            self._publish(row, material)
        return row

    async def delete(self, name: str) -> None:
        self._refuse_declared(name)
        users = list(self._bindings_to(name))
        if users:
            where = ", ".join(f"template {t!r} binding {ref!r}" for t, _, ref in users)
            raise ApiError(
                409,
                "in_use",
                f"credential source {name!r} is still referred to by {where}",
                [{"template": t, "binding": ref} for t, _, ref in users],
            )
        async with self._lock:
            deleted = await asyncio.to_thread(self.store.delete_source, name)
            if not deleted:
                raise self._not_found(name)
            self.state.remove_api_source(name)
        METRICS.inc(
            "egress_auth_admin_writes_total", resource="credential-sources", method="DELETE"
        )

    def _publish(self, row: SourceRow, material: Material) -> None:
        self.state.put_api_source(self._entry(row, material))
        self.schedule_expiry()

    # ---- expiry -----------------------------------------------------------------------------

    def purge_expired(self) -> list[str]:
        """Delete the sealed material of sources whose expiresAt has passed."""
        names = self.store.purge_expired(self.clock())
        for name in names:
            entry = self.state.snapshot.sources.get(name)
            if entry is not None and name not in self.state.declared_sources:
                self.state.put_api_source(
                    SourceEntry(entry.name, entry.version, entry.kind, None, entry.expires_at)
                )
            log.info("credential source %s expired: its material was purged", name)
        return names

    def schedule_expiry(self) -> None:
        """Arm one timer for the next expiry. Resolution checks the time on its own, so the
        timer only decides when the material leaves the disk and memory."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        upcoming = [
            e.expires_at
            for e in self.state.snapshot.sources.values()
            if e.expires_at is not None and e.material is not None
        ]
        if not upcoming:
            return
        delay = max(0.0, min(upcoming) - time.time())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._expiry = loop.call_later(delay + 0.01, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry = None
        self.purge_expired()
        self.schedule_expiry()


def check_body_name(given: str | None, path_name: str) -> None:
    if given is not None and given != path_name:
        raise ApiError(
            400,
            "invalid",
            "name in the body does not match the path",
            [{"field": "name", "message": "must match the path"}],
        )


def _count_write(method: str) -> None:
    METRICS.inc("egress_auth_admin_writes_total", resource="credential-sources", method=method)


def _cert_json(material: Material) -> dict[str, str] | None:
    info = _certificate(material)
    return info.model_dump(mode="json", by_alias=True) if info else None
