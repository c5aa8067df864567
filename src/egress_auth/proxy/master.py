"""The mitmproxy master that `egress-auth run` drives: only the addons a proxy like this needs.

mitmdump's DumpMaster loads about thirty addons (playback, map-local, HAR export, the mitm.it
onboarding app, ...). Every connection and request event is offered to each of them in turn,
so on a kept-alive connection their dispatch alone costs more than egress-auth's own hooks.
None of them does anything here, and some are surface a security proxy should not carry (the
onboarding app answers requests for a magic host name). `mitmdump -s addons/egress_auth.py`
still works and keeps the full set; this is what the `run` command uses.
"""

from __future__ import annotations

from mitmproxy import master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    tlsconfig,
)


class ProxyMaster(master.Master):
    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=True)
        self.addons.add(  # type: ignore[no-untyped-call]
            core.Core(),  # options and commands every addon relies on
            block.Block(),  # block_global / block_private, as mitmdump has them
            disable_h2c.DisableH2C(),  # no cleartext HTTP/2 upgrade smuggling past the proxy
            proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]  # the listener and the connection handlers
            next_layer.NextLayer(),  # picks HTTP / TLS / tunnel layers per connection
            tlsconfig.TlsConfig(),  # the CA, certificates and upstream verification
            errorcheck.ErrorCheck(),  # exit on start-up errors, as mitmdump does
        )
