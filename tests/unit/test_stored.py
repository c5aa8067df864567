"""StoredState: the store read into LiveState, with unchanged rows reusing their objects.

Real SQLite store in a temp dir; the read-only open is the one `run --workers` processes use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from egress_auth.metrics import Metrics
from egress_auth.model.config import ConfigFile
from egress_auth.secrets.store import Store, StoreError
from egress_auth.state import LiveState
from egress_auth.stored import StoredState

KEY = bytes(range(32))
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SECRET_1 = "stored_secret_one_Xy12"
SECRET_2 = "stored_secret_two_Zw34"
TEMPLATE = {"name": "base", "spec": {"network": {"mode": "allow-all"}}}


def _spec(secret: str) -> bytes:
    return json.dumps({"staticHeaders": {"values": {"token": secret}}}).encode()


def _network(host: str) -> str:
    rule = {"name": "r", "credentialRef": "tok", "domains": [host]}
    binding = {
        "ref": "tok",
        "sourceRef": "src",
        "projection": {
            "type": "http_headers",
            "httpHeaders": {"headers": [{"name": "X-T", "valueTemplate": "{{ .token }}"}]},
        },
    }
    return json.dumps({"egress": {"credentialRules": [rule]}, "credentialBindings": [binding]})


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path, KEY) as s:
        s.create_source(
            "src", "static_headers", _spec(SECRET_1), expires_at=None, certificate=None, now=T0
        )
        s.put_template("base", json.dumps(TEMPLATE), now=T0, create=True)
        s.create_sandbox("a", "base", _network("a.test"), b"\x01" * 32, now=T0)
        s.create_sandbox("b", "base", _network("b.test"), b"\x02" * 32, now=T0)
        yield s


def _live() -> LiveState:
    state = LiveState()
    state.apply(ConfigFile())
    return state


def test_readonly_open_reads_and_cannot_write(writer: Store, tmp_path: Path) -> None:
    with Store.open(tmp_path, KEY, readonly=True) as ro:
        assert [r.name for r in ro.list_sources()] == ["src"]
        with pytest.raises(Exception, match="readonly"):
            ro.delete_source("src")
    assert writer.get_source("src") is not None


def test_readonly_open_of_a_missing_store_fails(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open the store"):
        Store.open(tmp_path / "nothing-here", KEY, readonly=True)


def test_unchanged_rows_keep_their_objects(writer: Store, tmp_path: Path) -> None:
    state = _live()
    with Store.open(tmp_path, KEY, readonly=True) as ro:
        view = StoredState(ro, state)
        view.load()
        first = state.snapshot
        a1, b1 = first.policies["a"], first.policies["b"]
        src1 = first.sources["src"]
        assert src1.material is not None and src1.material.values["token"].reveal() == SECRET_1

        # Only sandbox b changes: a's compiled policy and the source are the same objects.
        writer.set_sandbox_network("b", _network("b2.test"), now=T0 + timedelta(seconds=1))
        view.load()
        second = state.snapshot
        assert second.policies["a"] is a1
        assert second.policies["b"] is not b1
        assert second.sources["src"] is src1

        # A rotation is seen (a new version); a deleted and re-created source too, even
        # though it starts again at version 1.
        writer.replace_source(
            "src", "static_headers", _spec(SECRET_2), expires_at=None, certificate=None,
            now=T0 + timedelta(seconds=2),
        )  # fmt: skip
        view.load()
        assert state.snapshot.sources["src"].material.values["token"].reveal() == SECRET_2  # type: ignore[union-attr]
        writer.delete_sandbox("a")
        writer.delete_sandbox("b")
        writer.delete_source("src")
        writer.create_source(
            "src", "static_headers", _spec(SECRET_1), expires_at=None, certificate=None,
            now=T0 + timedelta(seconds=3),
        )  # fmt: skip
        view.load()
        entry = state.snapshot.sources["src"]
        assert entry.version == 1
        assert entry.material is not None and entry.material.values["token"].reveal() == SECRET_1
        assert "a" not in state.snapshot.policies


def test_metrics_render_sums_other_processes() -> None:
    here, there = Metrics(), Metrics()
    here.inc("egress_auth_injections_total", rule="r1")
    there.inc("egress_auth_injections_total", rule="r1")
    there.inc("egress_auth_injections_total", rule="r1")
    there.inc("egress_auth_requests_total", decision="denied")
    # As it crosses the control socket: JSON turns tuples into lists.
    exported = json.loads(json.dumps(there.export()))
    text = here.render(exported)
    assert 'egress_auth_injections_total{rule="r1"} 3' in text
    assert 'egress_auth_requests_total{decision="denied"} 1' in text
    assert here.value("egress_auth_injections_total", rule="r1") == 1  # its own is unchanged
