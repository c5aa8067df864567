"""The front's small pure decisions (the relay itself is tested end to end in
tests/e2e/test_tunnel_relay.py)."""

from __future__ import annotations

from mitmproxy.addons import block
from mitmproxy.test import taddons

from egress_auth.proxy.front import same_host, unblocked


def test_unblocked_follows_mitmproxys_block_options() -> None:
    b = block.Block()
    with taddons.context(b) as tctx:
        # Defaults: block_global on, block_private off; loopback always passes.
        assert unblocked(("127.0.0.1", 5000))
        assert unblocked(("::1", 5000, 0, 0))
        assert unblocked(("10.1.2.3", 5000))
        assert not unblocked(("8.8.8.8", 5000))
        assert not unblocked(("::ffff:8.8.8.8", 5000, 0, 0))  # IPv4-mapped counts as IPv4
        tctx.configure(b, block_global=False, block_private=True)
        assert unblocked(("8.8.8.8", 5000))
        assert not unblocked(("10.1.2.3", 5000))
        assert not unblocked(("fe80::1%eth0", 5000, 0, 2))  # scope id stripped, then private
        assert unblocked(("127.0.0.1", 5000))
    # Not an address at all: mitmproxy decides.
    assert not unblocked(("not-an-ip", 1))
    assert not unblocked(None)


def test_same_host_normalises_before_comparing() -> None:
    assert same_host("Example.COM.", "example.com")
    assert same_host("bücher.example", "xn--bcher-kva.example")
    assert not same_host("other.example", "example.com")
    assert not same_host("bad host", "example.com")
