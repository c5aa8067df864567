"""Per-binding client-certificate contexts for the upstream TLS handshake, built in memory.

The key never touches the disk: it goes from the snapshot's material straight into an
OpenSSL context. Contexts are cached by the material object (one per source@version), so a
rotation builds a new context and an old one is dropped with the snapshot that held it.
"""

from __future__ import annotations

import asyncio
import weakref

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from ..secrets.material import TlsMaterial


def _x509(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


# TLS alert descriptions (RFC 8446 section 6) an upstream sends when it refuses us.
ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    49: "access_denied",
    70: "protocol_version",
    112: "unrecognized_name",
    116: "certificate_required",
}
_CERT_REQUEST_STATE = b"SSLv3/TLS read server certificate request"
_TICKET_STATE = b"SSLv3/TLS read server session ticket"


class UpstreamWatch:
    """What an upstream said about our TLS handshake, seen through OpenSSL's info callback.

    A TLS 1.3 server that rejects (or wants and does not get) a client certificate says so
    only after the handshake has completed on our side, with an alert. Left alone, the
    request goes out first and the client gets a bare error, or waits. The watch lets the
    first request on such a connection wait, briefly, until the server has either sent a
    post-handshake message (accepted) or an alert (refused).
    """

    def __init__(self) -> None:
        self.cert_requested = False
        self.handshake_done = False
        self.tls13 = False
        self.alert: str | None = None
        self.settled = asyncio.Event()

    def needs_verdict(self) -> bool:
        return not self.settled.is_set()

    def on_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT and ret >> 8 == 2:
            self.alert = ALERTS.get(ret & 0xFF, f"alert {ret & 0xFF}")
            self.settled.set()
        elif not self.handshake_done:
            if where & SSL.SSL_CB_LOOP and conn.get_state_string() == _CERT_REQUEST_STATE:
                self.cert_requested = True
            if where & SSL.SSL_CB_HANDSHAKE_DONE:
                self.handshake_done = True
                self.tls13 = conn.get_protocol_version_name() == "TLSv1.3"
                # Only a TLS 1.3 server that asked for a certificate can still refuse us.
                if not (self.tls13 and self.cert_requested):
                    self.settled.set()
        elif where & SSL.SSL_CB_LOOP and conn.get_state_string() == _TICKET_STATE:
            # A session ticket comes only after the server took our Finished (and with it
            # our certificate, or the lack of one): the handshake was accepted.
            self.settled.set()


def watch_connection(conn: SSL.Connection) -> UpstreamWatch:
    """Attach a watch to an upstream TLS connection (whose context has our info callback).

    mitmproxy logs a fatal alert read after the handshake but does not tell the HTTP layer,
    and then ignores the TCP close that follows, because OpenSSL has marked the connection
    as shut down: a request in flight would wait forever. Hiding that mark once an alert
    was seen lets the close through, so the request fails at once instead of hanging.
    """
    watch = UpstreamWatch()
    conn.set_app_data(watch)
    real_get_shutdown = conn.get_shutdown

    def get_shutdown() -> int:
        state = int(real_get_shutdown())
        return state & ~SSL.RECEIVED_SHUTDOWN if watch.alert else state

    conn.get_shutdown = get_shutdown  # type: ignore[method-assign]
    return watch


def _info_callback(conn: SSL.Connection, where: int, ret: int) -> None:
    watch = conn.get_app_data()
    if isinstance(watch, UpstreamWatch):
        watch.on_info(conn, where, ret)


def build_client_context(material: TlsMaterial | None, default_ca_file: str | None) -> SSL.Context:
    """A TLS client context presenting `material`'s chain and key.

    Trust: `caPem` alone when the source has it, else the proxy's upstream trust bundle
    (the defaults plus `upstreamCaFile`), so a binding never weakens verification.
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_info_callback(_info_callback)
    if material is None:
        ctx.load_verify_locations(default_ca_file or certifi.where())
        return ctx
    chain = x509.load_pem_x509_certificates(material.chain_pem)
    ctx.use_certificate(_x509(chain[0]))
    for cert in chain[1:]:
        ctx.add_extra_chain_cert(_x509(cert))
    key = serialization.load_pem_private_key(material.key_pem.reveal().encode(), password=None)
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    ctx.check_privatekey()
    if material.ca_pem is not None:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in x509.load_pem_x509_certificates(material.ca_pem):
            store.add_cert(_x509(ca))
    else:
        ctx.load_verify_locations(default_ca_file or certifi.where())
    return ctx


class ClientContexts:
    """Cache of contexts keyed by material identity; entries die with their material."""

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[TlsMaterial, tuple[str | None, SSL.Context]] = (
            weakref.WeakKeyDictionary()
        )
        self._plain: dict[str | None, SSL.Context] = {}

    def get(self, material: TlsMaterial | None, default_ca_file: str | None) -> SSL.Context:
        if material is None:
            # No certificate to present: still our context, for the info callback.
            if default_ca_file not in self._plain:
                self._plain[default_ca_file] = build_client_context(None, default_ca_file)
            return self._plain[default_ca_file]
        cached = self._cache.get(material)
        if cached is not None and cached[0] == default_ca_file:
            return cached[1]
        ctx = build_client_context(material, default_ca_file)
        self._cache[material] = (default_ca_file, ctx)
        return ctx
