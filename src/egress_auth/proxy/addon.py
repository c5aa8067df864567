"""The mitmproxy addon: hooks only. Decisions come from the pure core in `policy/`.

Per client connection it keeps what the client asked for (CONNECT host and port), the
address the proxy checked and will dial, and the client certificate chosen for it. Rules
see only the requested host:port; `connectTo` and DNS pinning change only where we dial.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mitmproxy import connection, ctx, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from .. import audit
from ..config import ConfigError, load_config
from ..model.config import ConfigFile, split_host_port
from ..policy.compile import CompiledPolicy, Snapshot
from ..policy.domains import normalize_host
from ..policy.match import (
    RequestFacts,
    check_traffic,
    could_match,
    parse_query,
    select_tls,
)
from ..policy.paths import normalize_path, split_target
from ..policy.verdict import verdict
from ..state import LiveState
from . import answers
from .conn import (
    Address,
    ConnState,
    close_after,
    connect_event,
    header_map,
    is_ip,
    is_loopback,
    resolve,
    sni_refused,
)
from .identity import Identity, Unauthenticated, identify, still_valid
from .passthrough import close_tunnel, watch_tunnel
from .tls import ClientContexts, watch_connection

log = logging.getLogger("egress_auth")

# How long the first request on a TLS 1.3 connection may wait for an upstream that asked
# for a client certificate to accept or refuse it (one round trip; bounded for servers
# that send no session ticket).
VERDICT_WAIT = 1.0


def _fail_closed_flow(
    hook: Callable[[EgressAuth, http.HTTPFlow], Awaitable[None]],
) -> Callable[[EgressAuth, http.HTTPFlow], Awaitable[None]]:
    """mitmproxy logs an addon's exception and forwards the request anyway; for a policy
    hook that would mean unchecked traffic. Answer 500 instead, and say nothing more."""

    @functools.wraps(hook)
    async def wrapper(self: EgressAuth, flow: http.HTTPFlow) -> None:
        try:
            await hook(self, flow)
        except Exception:
            log.exception("egress-auth internal error in %s", hook.__name__)
            flow.response = answers.error_response(
                500, "internal_error", "egress-auth could not decide on this request"
            )

    return wrapper


def _failing_server_context() -> SSL.Context:
    # A server context with no certificate: the client's handshake fails at once, which is
    # how a connection is refused after its ClientHello.
    return SSL.Context(SSL.TLS_SERVER_METHOD)


class EgressAuth:
    """Matches each request against credential rules and injects the bound secret."""

    def __init__(
        self,
        config: ConfigFile | None = None,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        loopback: bool = True,
    ) -> None:
        self.state = LiveState()
        # sandboxAuth's default: optional on a loopback listen address, required elsewhere.
        self.state.listen_loopback = loopback
        self.state.listeners.append(self._on_snapshot)
        self.config_path = config_path
        self.clock = clock
        self.conns: dict[str, ConnState] = {}
        self.contexts = ClientContexts()
        self.connect_to: dict[Address, Address] = {}
        # Called on SIGHUP before this process re-reads its file (`run --workers` passes the
        # signal on to the other proxy processes, which each read the file themselves).
        self.on_reload: list[Callable[[], None]] = []
        audit.setup()
        if config is not None:
            self.apply(config)

    # ---- configuration -------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "egress_auth_config", str, "", "Path of the egress-auth YAML config file."
        )

    def configure(self, updated: set[str]) -> None:
        if "listen_host" in updated:
            self.state.listen_loopback = is_loopback(ctx.options.listen_host)
        if "egress_auth_config" in updated and ctx.options.egress_auth_config:
            self.config_path = Path(ctx.options.egress_auth_config)
            # At start-up a bad file must stop mitmdump: raising here does that.
            self.apply(load_config(self.config_path).config)

    def apply(self, config: ConfigFile) -> None:
        connect_to = {}
        for src, dst in config.proxy.connect_to.items():
            h, p = split_host_port(src)
            connect_to[(normalize_host(h), p)] = split_host_port(dst)
        self.state.apply(config)
        self.connect_to = connect_to

    def running(self) -> None:
        # Not available off the main thread or on some platforms: then no SIGHUP reload.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def done(self) -> None:
        """The proxy is stopping: end the tunnels now, so each still gets its audit line
        (reason `shutdown`) while the loop runs its last callbacks."""
        for st in list(self.conns.values()):
            if st.close is not None:
                st.closed_by = st.closed_by or "shutdown"
                st.close()

    def reload(self) -> None:
        """SIGHUP: re-read the file; a bad file is refused and the running policy stays."""
        for hook in self.on_reload:
            hook()
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            loaded = load_config(self.config_path)
            self.apply(loaded.config)
        except ConfigError as e:
            for line in e.report.lines():
                log.error("reload refused: %s", line)
            return
        except Exception as e:  # a snapshot that cannot build must not take the proxy down
            log.error("reload refused: %s", type(e).__name__)
            return
        log.warning("config reloaded: snapshot generation %d", self.state.snapshot.generation)

    # ---- helpers -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.state.snapshot

    def _policy(self, sandbox: str) -> CompiledPolicy | None:
        return self.snapshot.policies.get(sandbox)

    def _target(self, host: str, port: int) -> Address:
        return self.connect_to.get((host, port), (host, port))

    def _event(
        self,
        st: ConnState,
        flow: http.HTTPFlow,
        path: str,
        decision: str,
        reason: str | None = None,
    ) -> audit.AuditEvent:
        return audit.AuditEvent(
            sandbox=st.sandbox,
            method=flow.request.method,
            host=st.host,
            port=st.port,
            path=path,
            decision=decision,
            traffic_rule=st.traffic_rule,
            reason=reason,
        )

    def _traffic_allowed(self, flow: http.HTTPFlow, st: ConnState, ev: audit.AuditEvent) -> bool:
        """Traffic policy for host, port and the address we will dial; refuse if it says no.

        A target that does not resolve is refused here too: letting mitmproxy resolve it
        again later would dial an address no CIDR rule was checked against.
        """
        policy = self._policy(st.sandbox)
        if policy is None:  # no policy for this sandbox: nothing is allowed
            self._refuse(flow, ev, answers.egress_denied(st.host, st.port, None, "block-all"))
            return False
        decision = check_traffic(policy, st.host, st.port, st.dial_ip)
        st.traffic_rule = ev.traffic_rule = decision.rule
        if not decision.allowed:
            self._refuse(
                flow, ev, answers.egress_denied(st.host, st.port, decision.rule, decision.mode)
            )
            return False
        if st.dial is None:
            ev.reason = "unresolvable"
            self._refuse(flow, ev, answers.unresolvable(st.host, st.port))
            return False
        return True

    def _refuse(self, flow: http.HTTPFlow, ev: audit.AuditEvent, response: http.Response) -> None:
        flow.response = response
        ev.emit(response.status_code)

    # ---- connection-level hooks ----------------------------------------------------------

    def _identify(self, flow: http.HTTPFlow) -> Identity | None:
        """The sandbox behind this request's Proxy-Authorization; answers 407 when none is."""
        snap = self.snapshot
        try:
            return identify(
                flow.request.headers.get("Proxy-Authorization"),
                snap.identities,
                required=snap.auth_required,
            )
        except Unauthenticated as e:
            flow.response = answers.proxy_auth_required(str(e))
            close_after(flow)  # a plain-http client's upstream connections go with it
            audit.AuditEvent(
                sandbox="",
                method=flow.request.method,
                host=flow.request.host,
                port=flow.request.port,
                path="",
                decision="denied",
                reason="proxy_auth",
            ).emit(407)
            return None

    @_fail_closed_flow
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        identity = self._identify(flow)
        if identity is None:
            return
        try:
            host = normalize_host(flow.request.host)
        except ValueError:
            flow.response = answers.error_response(400, "bad_request", "invalid CONNECT host")
            return
        port = flow.request.port
        st = await self.conn_state(identity, host, port)
        ev = self._event(st, flow, "", "denied")
        if not self._traffic_allowed(flow, st, ev):
            return
        st.tunnel = True
        self.conns[flow.client_conn.id] = st
        st.tls = select_tls(self.snapshot, st.sandbox, host, port, self.clock())
        if st.tls and st.tls.material is None and not st.tls.resolution.fail_open:
            # Fail-closed client certificate: do not dial at all. Accept the tunnel ourselves
            # (a CONNECT answered by an addon skips mitmproxy's eager dial) so that each
            # request on it can get a 503 that explains why.
            flow.response = http.Response.make(200, b"", {})
            flow.response.reason = "Connection established"

    async def dial_ip(self, host: str, port: int) -> str | None:
        """The address the proxy would dial for host:port (connectTo, then DNS)."""
        return await resolve(*self._target(host, port))

    async def conn_state(self, identity: Identity, host: str, port: int) -> ConnState:
        """A connection's state before any decision: target, and the address to dial."""
        dial_port = self._target(host, port)[1]
        ip = await self.dial_ip(host, port)
        return ConnState(identity, host, port, (ip, dial_port) if ip else None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._pin_server(data)
        except Exception:
            log.exception("egress-auth internal error in server_connect")
            data.server.error = "egress-auth internal error"

    def _pin_server(self, data: server_hooks.ServerConnectionHookData) -> None:
        st = self.conns.get(data.client.id)
        if st is None or data.server.address is None:
            return
        if st.tls and st.tls.material is None and not st.tls.resolution.fail_open:
            data.server.error = "client certificate unavailable (fail-closed)"
            return
        if st.refused:
            data.server.error = st.refused
            return
        # In a tunnel every upstream connection goes to the CONNECT target; a plain-http
        # client connection dials per request, to the address its request was checked for.
        dial = st.dial if st.tunnel else st.plain_dials.get(data.server.address)
        if dial is not None:
            data.server.address = dial
        if st.tunnel and data.server.sni is None and not is_ip(st.host):
            # Verify the upstream against the name the client asked for, not the pinned IP.
            data.server.sni = st.host

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        st = self.conns.get(data.context.client.id)
        if st is None:
            return
        if sni_refused(st, data.client_hello.sni):
            data.establish_server_tls_first = False  # tls_start_client fails the handshake
            return
        if self.intercepts(st.sandbox, st.host, st.port):
            return
        # No credential rule of this sandbox could apply: relay the bytes untouched. The
        # client then talks TLS with the upstream itself (its own certificate, pinning and
        # all); traffic policy was already checked on the CONNECT.
        data.ignore_connection = True
        client = data.context.client
        st.passthrough = watch_tunnel(client, data.context.server)
        st.client = client
        st.close = functools.partial(close_tunnel, client)

    def intercepts(self, sandbox: str, host: str, port: int) -> bool:
        """Whether a connection of this sandbox to host:port is decrypted (`intercept: all`,
        or some credential rule could apply) rather than relayed untouched."""
        config = self.state.config
        if config is None or config.proxy.intercept == "all":
            return True
        policy = self.snapshot.policies.get(sandbox)
        return policy is None or could_match(policy, host, port)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        """Close tunnels whose sandbox was revoked or whose traffic became denied: they see
        no requests of ours, so nothing else would stop them."""
        for st in list(self.conns.values()):
            if st.close is None:  # not a tunnel
                continue
            policy = snapshot.policies.get(st.sandbox)
            revoked = not still_valid(
                st.identity, snapshot.identities, required=snapshot.auth_required
            )
            if (
                revoked
                or policy is None
                or not check_traffic(policy, st.host, st.port, st.dial_ip).allowed
            ):
                st.closed_by = "revoked" if revoked else "denied"
                st.close()

    def tls_start_client(self, data: tls.TlsData) -> None:
        st = self.conns.get(data.context.client.id)
        if st is not None and st.refused:
            data.ssl_conn = SSL.Connection(_failing_server_context())
            data.ssl_conn.set_accept_state()

    def tls_start_server(self, data: tls.TlsData) -> None:
        st = self.conns.get(data.context.client.id)
        if st is None or not st.tunnel:
            return
        if data.ssl_conn is None:
            # As a `-s` script we run before mitmproxy's TlsConfig: let it build the
            # connection (SNI, ALPN, hostname check, trust) first, then add our certificate.
            tlsconfig = ctx.master.addons.get("tlsconfig")  # type: ignore[no-untyped-call]
            tlsconfig.tls_start_server(data)
        if data.ssl_conn is None:
            return
        # Swapping the context keeps the connection's SNI, ALPN and hostname check, and takes
        # the certificate, key and trust store from the binding's context.
        trust = ctx.options.ssl_verify_upstream_trusted_ca or None
        material = st.tls.material if st.tls is not None else None
        data.ssl_conn.set_context(self.contexts.get(material, trust))
        st.upstream = watch_connection(data.ssl_conn)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        st = self.conns.get(data.context.client.id)
        if st is not None:
            alert = st.upstream.alert if st.upstream else None
            st.tls_error = (
                f"the upstream refused the handshake (TLS alert {alert})"
                if alert
                else data.conn.error or "handshake failed"
            )

    async def _upstream_verdict(self, st: ConnState) -> None:
        """Wait (bounded) until a TLS 1.3 upstream that asked for a certificate has answered."""
        watch = st.upstream
        if watch is None:
            return
        if watch.needs_verdict():
            try:
                await asyncio.wait_for(watch.settled.wait(), VERDICT_WAIT)
            except TimeoutError:
                watch.settled.set()  # a server that sends no ticket: go on, once
        if watch.alert and st.tls_error is None:
            st.tls_error = f"the upstream refused the TLS session (TLS alert {watch.alert})"

    def client_disconnected(self, client: connection.Client) -> None:
        st = self.conns.pop(client.id, None)
        if st is not None and st.passthrough is not None:
            stats = st.passthrough
            extra: dict[str, object] = {}
            if stats.counted:
                extra = {"bytesUp": stats.bytes_up, "bytesDown": stats.bytes_down}
            connect_event(
                st,
                "tunnelled",
                traffic_rule=st.traffic_rule,
                reason=st.closed_by,
                started=stats.started,
                extra=extra,
            ).emit(None)

    # ---- request-level hooks -------------------------------------------------------------

    @_fail_closed_flow
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        st = await self._request_state(flow)
        # The proxy's own credentials never go upstream, whatever the client sent where.
        flow.request.headers.pop("Proxy-Authorization", None)
        if st is None:
            return  # answered already (407, or a request that names no host)
        snap = self.snapshot
        if not still_valid(st.identity, snap.identities, required=snap.auth_required):
            # Deleted or re-keyed while this connection stayed open.
            flow.response = answers.proxy_auth_required("the sandbox was revoked")
            self._event(st, flow, "", "denied", reason="proxy_auth").emit(407)
            close_after(flow)  # and its upstream connection with it
            return
        raw_path, query = split_target(flow.request.path)
        path = normalize_path(raw_path)
        facts = RequestFacts(
            scheme=flow.request.scheme,
            host=st.host,
            port=st.port,
            method=flow.request.method,
            path=path,
            query=parse_query(query),
            headers=header_map(flow.request.headers),
        )
        await self._upstream_verdict(st)
        v = verdict(snap, st.sandbox, facts, st.dial_ip, self.clock(), st.tls)
        ev = self._event(st, flow, path, v.decision, reason=v.reason)
        ev.traffic_rule = v.traffic_rule
        if v.resolution is not None:
            res = v.resolution
            ev.credential_rule, ev.binding, ev.source = res.rule, res.binding, res.source_at_version
        if v.decision == "denied":
            denial = (
                answers.unresolvable(st.host, st.port)
                if v.reason == "unresolvable"
                else answers.egress_denied(st.host, st.port, v.traffic_rule, v.mode)
            )
            self._refuse(flow, ev, denial)
            if st.tunnel:
                close_after(flow)  # this tunnel's host is no longer allowed at all
            return
        connection_level = st.tls is not None and v.resolution is st.tls.resolution
        if v.decision == "failed-closed" and connection_level:
            assert v.resolution is not None
            self._refuse(flow, ev, answers.credential_unavailable(v.resolution))
            return
        if st.tls_error is not None:
            ev.decision, ev.reason = "failed-closed", "upstream_tls"
            self._refuse(flow, ev, answers.upstream_tls_error(st.host, st.port, st.tls_error))
            return
        if v.decision == "failed-closed":
            assert v.resolution is not None
            self._refuse(flow, ev, answers.credential_unavailable(v.resolution))
            return
        if v.headers:
            # The upstream gets exactly the path the rules saw.
            flow.request.path = path + (f"?{query}" if query else "")
            for name, value in v.headers:
                flow.request.headers[name] = value.reveal()
        if v.decision != "passed":
            flow.metadata["egress_auth"] = ev

    async def _request_state(self, flow: http.HTTPFlow) -> ConnState | None:
        st = self.conns.get(flow.client_conn.id)
        if st is not None and st.tunnel:
            return st
        if flow.client_conn.tls_established:
            # TLS without a CONNECT we checked: nothing to decide on, so nothing goes out.
            flow.response = answers.error_response(
                400, "bad_request", "the request names no host egress-auth can check"
            )
            return None
        # A plain-http request in absolute form: it carries its own Proxy-Authorization,
        # and its URL names what the client asked for.
        identity = self._identify(flow)
        if identity is None:
            return None
        try:
            host = normalize_host(flow.request.host)
        except ValueError:
            flow.response = answers.error_response(400, "bad_request", "invalid request host")
            return None
        port = flow.request.port
        req = await self.conn_state(identity, host, port)
        holder = self.conns.setdefault(flow.client_conn.id, req)
        if req.dial is not None:
            holder.plain_dials[(flow.request.host, port)] = req.dial
        return req

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = self.conns.get(flow.client_conn.id)
        if st is not None and st.tunnel and flow.response is not None and self._stale(st):
            # Re-scoped so that this host is denied, or the client certificate rotated or
            # removed: let this response finish, then close, so the next request opens a
            # connection under the new policy.
            close_after(flow)

    def _stale(self, st: ConnState) -> bool:
        """Whether what this connection was opened under no longer holds: its host is no
        longer allowed, or its client certificate changed. (A change of header rules needs
        no new connection: every request is decided against the current snapshot.)

        Checked once per snapshot, not on every response: what it depends on changes only
        with the snapshot (a TLS source's expiry purges and swaps one too, for API sources).
        """
        generation = self.snapshot.generation
        if st.fresh_at == generation:
            return False
        if self._stale_now(st):
            return True
        st.fresh_at = generation
        return False

    def _stale_now(self, st: ConnState) -> bool:
        policy = self.snapshot.policies.get(st.sandbox)
        if policy is None or not check_traffic(policy, st.host, st.port, st.dial_ip).allowed:
            return True
        if st.tls is None:
            return False
        now = select_tls(self.snapshot, st.sandbox, st.host, st.port, self.clock())
        if now is None:
            return True
        return (now.resolution.source, now.resolution.version, now.material) != (
            st.tls.resolution.source,
            st.tls.resolution.version,
            st.tls.material,
        )

    def response(self, flow: http.HTTPFlow) -> None:
        ev = flow.metadata.pop("egress_auth", None)
        if isinstance(ev, audit.AuditEvent) and flow.response is not None:
            ev.emit(flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        ev = flow.metadata.pop("egress_auth", None)
        if isinstance(ev, audit.AuditEvent):
            ev.reason = ev.reason or "upstream_error"
            ev.emit(502)
