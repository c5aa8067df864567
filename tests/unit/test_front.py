"""The front's small pure decisions (the relay itself is tested end to end in
tests/e2e/test_tunnel_relay.py)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import yaml
from mitmproxy.addons import block
from mitmproxy.test import taddons

from egress_auth import audit
from egress_auth.config import load_config_text
from egress_auth.proxy.addon import EgressAuth
from egress_auth.proxy.conn import ConnState, sni_refused
from egress_auth.proxy.front import Front, parse_connect, unblocked
from egress_auth.proxy.identity import Identity


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


def _sni_refused(sni: str | None, host: str) -> bool:
    return sni_refused(ConnState(Identity("default", None), host, 443, None), sni)


def test_sni_is_normalised_before_it_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(audit, "_out", out)
    assert not _sni_refused("Example.COM.", "example.com")
    assert not _sni_refused("bücher.example", "xn--bcher-kva.example")
    assert not _sni_refused(None, "example.com")  # no SNI: the CONNECT target stands
    assert out.getvalue() == ""
    assert _sni_refused("other.example", "example.com")
    assert _sni_refused("bad host", "example.com")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["decision"], d["reason"]) for d in lines] == [("denied", "sni_mismatch")] * 2


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


# ---- the protocol itself, in-process on loopback sockets ---------------------------------


def _addon(echo_port: int) -> EgressAuth:
    loaded = load_config_text(
        yaml.safe_dump(
            {
                "proxy": {"connectTo": {"raw.example.test:7000": f"127.0.0.1:{echo_port}"}},
                "templates": [{"name": "default", "spec": {"network": {"egress": {}}}}],
            }
        )
    )
    return EgressAuth(config=loaded.config)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


def test_an_idle_tunnel_is_closed_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(audit, "_out", out)

    async def scenario() -> bytes:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        addon = _addon(echo.sockets[0].getsockname()[1])

        async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raise AssertionError("a tunnel of the front's own must not reach mitmproxy")

        loop = asyncio.get_running_loop()
        front = await loop.create_server(Front(addon, never, idle=0.3), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", front.sockets[0].getsockname()[1]
        )
        writer.write(b"CONNECT raw.example.test:7000 HTTP/1.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        # Then nothing either way: the front closes it after 0.3 s.
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        front.close()
        echo.close()
        await asyncio.sleep(0.05)  # let the closing callbacks write the audit line
        assert rest == b""
        return head

    head = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 200")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["decision"] == "tunnelled" and line["reason"] == "idle"
    assert line["bytesUp"] == line["bytesDown"] == 4


def test_what_the_front_does_not_take_reaches_mitmproxy_byte_for_byte() -> None:
    head = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n"

    async def scenario() -> bytes:
        addon = _addon(9)  # never dialled here
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def mitmproxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.readexactly(len(head) + 5))
            writer.write(b"answered")
            writer.close()

        loop = asyncio.get_running_loop()
        front = await loop.create_server(Front(addon, mitmproxy), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", front.sockets[0].getsockname()[1]
        )
        writer.write(head[:10])  # in pieces, the rest after the hand-over
        await asyncio.sleep(0.05)
        writer.write(head[10:] + b"after")
        seen = await asyncio.wait_for(got, 5)
        assert await asyncio.wait_for(reader.read(), 5) == b"answered"
        writer.close()
        front.close()
        return seen

    assert asyncio.run(scenario()) == head + b"after"
