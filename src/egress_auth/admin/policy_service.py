"""Templates and sandboxes through the API, and `explain`.

Every write: validate (shape by pydantic, then the effective policies it changes) -> one
store transaction -> rebuild and swap the snapshot -> answer. Deleting a sandbox or changing
its policy applies to its open connections from their next request on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..metrics import METRICS
from ..model.policy import SandboxNetworkPolicy, Template, TemplateReplace
from ..model.sandboxes import (
    ExplainRequest,
    ExplainResult,
    NetworkOverrides,
    SandboxCreate,
    SandboxCreated,
    SandboxInfo,
)
from ..policy.domains import normalize_host
from ..policy.effective import effective_policy
from ..policy.match import RequestFacts, parse_query, select_tls
from ..policy.paths import normalize_path, split_target
from ..policy.validate import format_path, validate_policy
from ..policy.verdict import verdict
from ..proxy.identity import DEFAULT_SANDBOX, token_hash
from ..secrets.policy_rows import SandboxRow, StoreConflict
from ..secrets.store import Store
from ..state import LiveState
from ..stored import StoredState
from .service import ApiError

Resolver = Callable[[str, int], Awaitable[str | None]]

_STARTED = datetime.now(UTC)


def _dump(model: Any) -> str:
    return json.dumps(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def _count(resource: str, method: str) -> None:
    METRICS.inc("egress_auth_admin_writes_total", resource=resource, method=method)


@dataclass
class PolicyService:
    store: Store
    state: LiveState
    proxy_address: tuple[str, int]
    resolve: Resolver  # the proxy's own connectTo + DNS path, so explain sees what it sees
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stored: StoredState = field(init=False)

    def __post_init__(self) -> None:
        self._stored = StoredState(self.store, self.state)

    # ---- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        self._stored.load_policy()

    async def _commit(self, write: Callable[[], Any]) -> Any:
        """Run one store write off the loop, then swap in a snapshot built from the store."""
        async with self._lock:
            result = await asyncio.to_thread(write)
            self.load()
            return result

    # ---- validation -------------------------------------------------------------------------

    def _check(self, policies: list[tuple[str, SandboxNetworkPolicy]]) -> None:
        sources = self.state.known_sources()
        problems = []
        for where, policy in policies:
            for loc, msg, sev in validate_policy(policy, sources):
                if sev == "error":
                    problems.append({"field": f"{where}{format_path(loc)}", "message": msg})
        if problems:
            raise ApiError(
                400, "invalid", f"{problems[0]['field']}: {problems[0]['message']}", problems
            )

    def _template_users(self, name: str) -> list[str]:
        return sorted(sb.id for sb in self.state.sandboxes().values() if sb.template == name)

    # ---- templates --------------------------------------------------------------------------

    def list_templates(self) -> list[Template]:
        return [t for _, t in sorted(self.state.templates().items())]

    def get_template(self, name: str) -> Template:
        template = self.state.templates().get(name)
        if template is None:
            raise ApiError(404, "not_found", f"template {name!r} does not exist")
        return template

    def _refuse_declared_template(self, name: str) -> None:
        if name in self.state.declared_templates():
            raise ApiError(
                409,
                "read_only",
                f"template {name!r} is declared in the config "
                "file and is read-only through the API",
            )

    async def create_template(self, template: Template) -> Template:
        self._refuse_declared_template(template.name)
        self._check([("spec.network.", template.spec.network)])
        try:
            await self._commit(
                lambda: self.store.put_template(
                    template.name, _dump(template), now=self.clock(), create=True
                )
            )
        except StoreConflict:
            raise ApiError(409, "conflict", f"template {template.name!r} already exists") from None
        _count("templates", "POST")
        return template

    async def replace_template(self, name: str, body: TemplateReplace) -> Template:
        if body.name is not None and body.name != name:
            raise ApiError(
                400,
                "invalid",
                "name in the body does not match the path",
                [{"field": "name", "message": "must match the path"}],
            )
        self._refuse_declared_template(name)
        if self.store.get_template(name) is None:
            raise ApiError(404, "not_found", f"template {name!r} does not exist")
        template = Template(name=name, description=body.description, spec=body.spec)
        # The change must hold for every sandbox built on it, with its own overrides.
        checks = [("spec.network.", template.spec.network)]
        for sb in self.state.sandboxes().values():
            if sb.template == name and sb.network is not None:
                merged = effective_policy(template.spec.network, sb.network)
                checks.append((f"(sandbox {sb.id!r}) ", merged))
        self._check(checks)
        await self._commit(
            lambda: self.store.put_template(name, _dump(template), now=self.clock(), create=False)
        )
        _count("templates", "PUT")
        return template

    async def delete_template(self, name: str) -> None:
        self._refuse_declared_template(name)
        config = self.state.config
        if config is not None and name == config.proxy.default_template:
            raise ApiError(409, "in_use", f"template {name!r} is the defaultTemplate")
        users = self._template_users(name)
        if users:
            raise ApiError(
                409,
                "in_use",
                f"template {name!r} is used by sandboxes {', '.join(users)}",
                [{"sandbox": u} for u in users],
            )
        if not await self._commit(lambda: self.store.delete_template(name)):
            raise ApiError(404, "not_found", f"template {name!r} does not exist")
        _count("templates", "DELETE")

    # ---- sandboxes --------------------------------------------------------------------------

    def _info(self, sandbox_id: str) -> SandboxInfo:
        row = self.store.get_sandbox(sandbox_id)
        if row is not None:
            return SandboxInfo(
                id=row.id,
                template=row.template,
                created_at=row.created_at,
                updated_at=row.updated_at,
                origin="api",
            )
        spec = self.state.sandboxes().get(sandbox_id)
        if spec is None:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id!r} does not exist")
        # Declared sandboxes have no stored history: their time is this process's start.
        return SandboxInfo(
            id=spec.id,
            template=spec.template,
            created_at=_STARTED,
            updated_at=_STARTED,
            origin="config",
        )

    def list_sandboxes(self) -> list[SandboxInfo]:
        return [self._info(sid) for sid in sorted(self.state.sandboxes())]

    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._info(sandbox_id)

    async def create_sandbox(self, body: SandboxCreate) -> SandboxCreated:
        if body.id == DEFAULT_SANDBOX or body.id in self.state.sandboxes():
            raise ApiError(409, "conflict", f"sandbox id {body.id!r} is taken")
        template = self.state.templates().get(body.template)
        if template is None:
            raise ApiError(
                400,
                "invalid",
                f"template: no template {body.template!r}",
                [{"field": "template", "message": "no such template"}],
            )
        if body.network is not None:
            self._check([("network.", effective_policy(template.spec.network, body.network))])
        token = secrets.token_urlsafe(32)
        network = _dump(body.network) if body.network is not None else None
        try:
            row: SandboxRow = await self._commit(
                lambda: self.store.create_sandbox(
                    body.id, body.template, network, token_hash(token), now=self.clock()
                )
            )
        except StoreConflict:
            raise ApiError(409, "conflict", f"sandbox id {body.id!r} is taken") from None
        _count("sandboxes", "POST")
        host, port = self.proxy_address
        shown = f"[{host}]" if ":" in host else host
        return SandboxCreated(
            id=row.id,
            template=row.template,
            created_at=row.created_at,
            updated_at=row.updated_at,
            origin="api",
            token=token,
            proxy_url=f"http://{row.id}:{token}@{shown}:{port}",
        )

    def _api_sandbox(self, sandbox_id: str) -> SandboxRow:
        row = self.store.get_sandbox(sandbox_id)
        if row is None:
            if sandbox_id in self.state.sandboxes():
                raise ApiError(
                    409,
                    "read_only",
                    f"sandbox {sandbox_id!r} is declared in the "
                    "config file and is read-only through the API",
                )
            raise ApiError(404, "not_found", f"sandbox {sandbox_id!r} does not exist")
        return row

    async def delete_sandbox(self, sandbox_id: str) -> None:
        self._api_sandbox(sandbox_id)
        # Once the snapshot is swapped, its token no longer opens anything: open
        # connections get 407 on their next request.
        await self._commit(lambda: self.store.delete_sandbox(sandbox_id))
        _count("sandboxes", "DELETE")

    def get_network(self, sandbox_id: str) -> NetworkOverrides:
        spec = self.state.sandboxes().get(sandbox_id)
        if spec is None:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id!r} does not exist")
        return spec.network or NetworkOverrides()

    async def put_network(self, sandbox_id: str, network: NetworkOverrides) -> NetworkOverrides:
        row = self._api_sandbox(sandbox_id)
        template = self.state.templates().get(row.template)
        if template is not None:
            self._check([("", effective_policy(template.spec.network, network))])
        await self._commit(
            lambda: self.store.set_sandbox_network(sandbox_id, _dump(network), now=self.clock())
        )
        _count("sandboxes", "PUT")
        return network

    def effective_network(self, sandbox_id: str) -> SandboxNetworkPolicy:
        spec = self.state.sandboxes().get(sandbox_id)
        if spec is None:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id!r} does not exist")
        policy = self.state.effective(spec)
        if policy is None:
            raise ApiError(
                409,
                "conflict",
                f"sandbox {sandbox_id!r} has no template "
                f"{spec.template!r}: every request of it is refused",
            )
        return policy

    # ---- explain ----------------------------------------------------------------------------

    async def explain(self, sandbox_id: str, req: ExplainRequest) -> ExplainResult:
        if sandbox_id != DEFAULT_SANDBOX and sandbox_id not in self.state.sandboxes():
            raise ApiError(404, "not_found", f"sandbox {sandbox_id!r} does not exist")
        parts = urlsplit(req.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(
                400,
                "invalid",
                "url: must be an absolute http(s) URL",
                [{"field": "url", "message": "must be an absolute http(s) URL"}],
            )
        try:
            host = normalize_host(parts.hostname)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ApiError(
                400, "invalid", f"url: {e}", [{"field": "url", "message": str(e)}]
            ) from None
        target = parts.path or "/"
        raw_path, query = split_target(target + (f"?{parts.query}" if parts.query else ""))
        headers: dict[str, list[str]] = {}
        for name, value in (req.headers or {}).items():
            headers.setdefault(name.lower(), []).append(value)
        facts = RequestFacts(
            scheme=parts.scheme,
            host=host,
            port=port,
            method=req.method.upper(),
            path=normalize_path(raw_path),
            query=parse_query(query),
            headers=headers,
        )
        snap = self.state.snapshot
        ip = await self.resolve(host, port)
        now = time.time()
        tls = select_tls(snap, sandbox_id, host, port, now) if parts.scheme == "https" else None
        v = verdict(snap, sandbox_id, facts, ip, now, tls)
        return ExplainResult.model_validate(v.explain())
