"""Per-binding client-certificate contexts for the upstream TLS handshake, built in memory.

The key never touches the disk: it goes from the snapshot's material straight into an
OpenSSL context. Contexts are cached by the material object (one per source@version), so a
rotation builds a new context and an old one is dropped with the snapshot that held it.
"""

from __future__ import annotations

import weakref

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from ..secrets.material import TlsMaterial


def _x509(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def build_client_context(material: TlsMaterial, default_ca_file: str | None) -> SSL.Context:
    """A TLS client context presenting `material`'s chain and key.

    Trust: `caPem` alone when the source has it, else the proxy's upstream trust bundle
    (the defaults plus `upstreamCaFile`), so a binding never weakens verification.
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
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

    def get(self, material: TlsMaterial, default_ca_file: str | None) -> SSL.Context:
        cached = self._cache.get(material)
        if cached is not None and cached[0] == default_ca_file:
            return cached[1]
        ctx = build_client_context(material, default_ca_file)
        self._cache[material] = (default_ca_file, ctx)
        return ctx
