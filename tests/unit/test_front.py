"""The front's small pure decisions (the relay itself is tested end to end in
tests/e2e/test_tunnel_relay.py)."""

from __future__ import annotations

from mitmproxy.addons import block
from mitmproxy.test import taddons

from egress_auth.proxy.front import parse_connect, same_host, unblocked


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


AUTH = b"Proxy-Authorization: Basic c2J4OnRvaw==\r\n"


def test_parse_connect_reads_a_plain_head() -> None:
    head = b"CONNECT Api.Example.COM:443 HTTP/1.1\r\nHost: api.example.com:443\r\n" + AUTH + b"\r\n"
    assert parse_connect(head) == ("api.example.com", 443, "Basic c2J4OnRvaw==")
    assert parse_connect(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n") == ("::1", 8443, None)
    assert parse_connect(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nproxy-authorization:x\r\n\r\n") == (
        "10.0.0.1",
        22,
        "x",
    )


def test_parse_connect_leaves_everything_unusual_to_mitmproxy() -> None:
    refused = [
        b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        b"connect a.example:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.0\r\n\r\n",
        b"CONNECT a.example HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:0 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:443  HTTP/1.1\r\n\r\n",
        b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\n" + AUTH + AUTH + b"\r\n",  # which one?
        b"CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nno colon\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nX : a\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
    ]
    for head in refused:
        assert parse_connect(head) is None, head
