"""The admin API (SPEC section 6): FastAPI app factory, envelopes, auth, size limit.

Handlers are one call into `SourceService`; response models are the public metadata
shapes, so a secret cannot be echoed by construction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Generic, Literal, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..metrics import METRICS, Counters
from ..model.policy import SandboxNetworkPolicy, Template, TemplateReplace
from ..model.sandboxes import (
    ExplainRequest,
    ExplainResult,
    NetworkOverrides,
    SandboxCreate,
    SandboxCreated,
    SandboxInfo,
)
from ..model.sources import CredentialSource, SourceMetadata, SourceReplace
from .auth import token_matches
from .policy_service import PolicyService
from .service import ApiError, SourceService

MAX_BODY = 1024 * 1024

T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Ok(BaseModel, Generic[T]):
    success: Literal[True] = True
    data: T


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class Failure(BaseModel):
    success: Literal[False] = False
    error: ErrorBody


def failure(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body = Failure(error=ErrorBody(code=code, message=message, details=details))
    return JSONResponse(body.model_dump(), status_code=status)


class BodyLimit:
    """Refuse request bodies over MAX_BODY with 413, declared or streamed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await failure(413, "too_large", f"request body over {MAX_BODY} bytes")(
                scope, receive, send
            )
            return
        # Read the whole body first (it is small, or refused): an error raised while the
        # route reads it would be turned into a 400 by FastAPI.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = bool(message.get("more_body"))
            if size > MAX_BODY:
                await failure(413, "too_large", f"request body over {MAX_BODY} bytes")(
                    scope, receive, send
                )
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class SyncWrites:
    """Under `run --workers N`, answer a successful write only once every proxy process has
    applied it: a client that got its answer may open its next connection to any of them."""

    def __init__(self, app: ASGIApp, sync: Callable[[], Awaitable[bool]]) -> None:
        self.app = app
        self.sync = sync

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return

        async def send_after_sync(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                await self.sync()
            await send(message)

        await self.app(scope, receive, send_after_sync)


def _validation_details(exc: RequestValidationError) -> list[dict[str, str]]:
    # Only where and why: pydantic's `input` and `ctx` could hold the secret that was sent.
    out = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")
        out.append({"field": ".".join(loc), "message": msg})
    return out


def create_app(
    service: SourceService,
    admin_token: str,
    ca_pem: Callable[[], bytes],
    policy: PolicyService,
    sync: Callable[[], Awaitable[bool]] | None = None,
    other_metrics: Callable[[], Awaitable[list[Counters]]] | None = None,
) -> FastAPI:
    app = FastAPI(
        title="egress-auth admin API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return failure(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"field": "", "message": "invalid request"}
        where = f"{first['field']}: " if first["field"] else ""
        return failure(400, "invalid", f"{where}{first['message']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return failure(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return failure(500, "internal_error", "internal error")

    @app.get("/healthz", response_model=Ok[dict[str, str]])
    async def healthz() -> Ok[dict[str, str]]:
        return Ok(data={"status": "ok"})

    @app.get("/api/v1/ca.pem", response_class=PlainTextResponse)
    async def ca() -> Response:
        return Response(ca_pem(), media_type="application/x-pem-file")

    api = APIRouter(prefix="/api/v1")

    @api.get("/credential-sources", response_model=Ok[list[SourceMetadata]])
    async def list_sources() -> Ok[list[SourceMetadata]]:
        return Ok(data=service.list_all())

    @api.post(
        "/credential-sources",
        status_code=201,
        response_model=Ok[SourceMetadata],
        responses={400: {"model": Failure}, 409: {"model": Failure}},
    )
    async def create_source(body: CredentialSource) -> Ok[SourceMetadata]:
        return Ok(data=await service.create(body))

    @api.get(
        "/credential-sources/{name}",
        response_model=Ok[SourceMetadata],
        responses={404: {"model": Failure}},
    )
    async def get_source(name: str) -> Ok[SourceMetadata]:
        return Ok(data=service.get(name))

    @api.put(
        "/credential-sources/{name}",
        response_model=Ok[SourceMetadata],
        responses={400: {"model": Failure}, 404: {"model": Failure}, 409: {"model": Failure}},
    )
    async def replace_source(name: str, body: SourceReplace) -> Ok[SourceMetadata]:
        return Ok(data=await service.replace(name, body))

    @api.delete(
        "/credential-sources/{name}",
        response_model=Ok[dict[str, str]],
        responses={404: {"model": Failure}, 409: {"model": Failure}},
    )
    async def delete_source(name: str) -> Ok[dict[str, str]]:
        await service.delete(name)
        return Ok(data={"name": name, "deleted": "true"})

    _policy_routes(api, policy)
    app.include_router(api)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        others = await other_metrics() if other_metrics is not None else []
        return PlainTextResponse(METRICS.render(*others), media_type="text/plain; version=0.0.4")

    # Added last, so it runs first: a request without the token is refused before its body
    # is even read (a malformed body must not answer 400 to a stranger).
    if sync is not None:
        app.add_middleware(SyncWrites, sync=sync)
    app.add_middleware(BodyLimit)
    app.add_middleware(AdminAuth, token=admin_token)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _policy_routes(api: APIRouter, policy: PolicyService) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"model": Failure} for code in (400, 404, 409)}

    @api.get("/templates", response_model=Ok[list[Template]])
    async def list_templates() -> Ok[list[Template]]:
        return Ok(data=policy.list_templates())

    @api.post("/templates", status_code=201, response_model=Ok[Template], responses=errors)
    async def create_template(body: Template) -> Ok[Template]:
        return Ok(data=await policy.create_template(body))

    @api.get("/templates/{name}", response_model=Ok[Template], responses=errors)
    async def get_template(name: str) -> Ok[Template]:
        return Ok(data=policy.get_template(name))

    @api.put("/templates/{name}", response_model=Ok[Template], responses=errors)
    async def replace_template(name: str, body: TemplateReplace) -> Ok[Template]:
        return Ok(data=await policy.replace_template(name, body))

    @api.delete("/templates/{name}", response_model=Ok[dict[str, str]], responses=errors)
    async def delete_template(name: str) -> Ok[dict[str, str]]:
        await policy.delete_template(name)
        return Ok(data={"name": name, "deleted": "true"})

    @api.get("/sandboxes", response_model=Ok[list[SandboxInfo]])
    async def list_sandboxes() -> Ok[list[SandboxInfo]]:
        return Ok(data=policy.list_sandboxes())

    @api.post("/sandboxes", status_code=201, response_model=Ok[SandboxCreated], responses=errors)
    async def create_sandbox(body: SandboxCreate) -> Ok[SandboxCreated]:
        return Ok(data=await policy.create_sandbox(body))

    @api.get("/sandboxes/{sandbox_id}", response_model=Ok[SandboxInfo], responses=errors)
    async def get_sandbox(sandbox_id: str) -> Ok[SandboxInfo]:
        return Ok(data=policy.get_sandbox(sandbox_id))

    @api.delete("/sandboxes/{sandbox_id}", response_model=Ok[dict[str, str]], responses=errors)
    async def delete_sandbox(sandbox_id: str) -> Ok[dict[str, str]]:
        await policy.delete_sandbox(sandbox_id)
        return Ok(data={"id": sandbox_id, "deleted": "true"})

    @api.get(
        "/sandboxes/{sandbox_id}/network", response_model=Ok[NetworkOverrides], responses=errors
    )
    async def get_network(sandbox_id: str) -> Ok[NetworkOverrides]:
        return Ok(data=policy.get_network(sandbox_id))

    @api.put(
        "/sandboxes/{sandbox_id}/network", response_model=Ok[NetworkOverrides], responses=errors
    )
    async def put_network(sandbox_id: str, body: NetworkOverrides) -> Ok[NetworkOverrides]:
        return Ok(data=await policy.put_network(sandbox_id, body))

    @api.get(
        "/sandboxes/{sandbox_id}/effective-network",
        response_model=Ok[SandboxNetworkPolicy],
        responses=errors,
    )
    async def effective_network(sandbox_id: str) -> Ok[SandboxNetworkPolicy]:
        return Ok(data=policy.effective_network(sandbox_id))

    @api.post("/sandboxes/{sandbox_id}/explain", response_model=Ok[ExplainResult], responses=errors)
    async def explain(sandbox_id: str, body: ExplainRequest) -> Ok[ExplainResult]:
        return Ok(data=await policy.explain(sandbox_id, body))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The schema as the server behaves: validation failures are 400 in our envelope (FastAPI
    would document 422), and the admin token is a bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {
                    "description": "Invalid request",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Failure"}}
                    },
                }
            if path not in PUBLIC_PATHS:
                op["security"] = [{"bearer": []}]
                responses["401"] = {"description": "Missing or wrong admin token"}
    schemas = components.get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if "Failure" not in schemas:
        schemas.update(
            Failure.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {})
        )
        schemas["Failure"] = Failure.model_json_schema(ref_template="#/components/schemas/{model}")
    app.openapi_schema = schema
    return schema


PUBLIC_PATHS = frozenset({"/healthz", "/api/v1/ca.pem", "/openapi.json"})


class AdminAuth:
    """Every path but the public ones needs `Authorization: Bearer <admin token>`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in PUBLIC_PATHS:
            headers = dict(scope.get("headers") or [])
            value = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = value.partition(" ")
            if scheme.lower() != "bearer" or not token_matches(given.strip(), self.token):
                response = failure(401, "unauthorized", "a valid admin bearer token is required")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
