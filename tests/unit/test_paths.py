from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auth.policy.paths import normalize_path, split_target

SETTINGS = settings(max_examples=250, deadline=None)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b", ("/a/b", "")),
        ("/a/b?x=1&y=2", ("/a/b", "x=1&y=2")),
        ("/a/b?x=1#frag", ("/a/b", "x=1")),
        ("/a/b#frag?not=query", ("/a/b", "")),
        ("/a?b?c", ("/a", "b?c")),
        ("/a?", ("/a", "")),
        ("", ("", "")),
        ("*", ("*", "")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("*", "*"),
        ("/a/b/c", "/a/b/c"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/.", "/"),
        ("/../a", "/a"),
        ("/../../a/../../b", "/b"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2e/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/a/%2e%2e", "/"),
        ("/a/%2e%2e%2e/b", "/a/%2e%2e%2e/b"),
        ("/a/...", "/a/..."),
        ("/a/..a/b", "/a/..a/b"),
        ("/a/b%2F..%2Fc", "/a/b%2F..%2Fc"),
        ("/a/b/..%2Fc", "/a/b/..%2Fc"),
        ("/a/%2F/../c", "/a/c"),
        ("//a", "//a"),
        ("//a/../b", "//b"),
        ("/a//b", "/a//b"),
        ("/a//../b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/%41%20b/c", "/%41%20b/c"),
        ("/caf\u00e9/./x", "/caf\u00e9/x"),
        ("a/b", "/a/b"),
        ("../a", "/a"),
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


# --- reference implementation ---------------------------------------------


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, transcribed step by step on literal dots."""
    inp = path
    out = ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: max(out.rfind("/"), 0)]
        elif inp == "/..":
            inp = "/"
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            cut = inp.find("/", start)
            cut = len(inp) if cut == -1 else cut
            out += inp[:cut]
            inp = inp[cut:]
    return out


def _is_dot_segment(segment: str) -> bool:
    return re.sub("%2e", ".", segment, flags=re.IGNORECASE) in (".", "..")


_SEGMENTS = st.one_of(
    st.sampled_from(
        [".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2E.", "", "a", "b", "%2F", "a%2Fb"]
    ),
    st.sampled_from(["...", "..a", ".a", "%2e%2e%2e", "%252e", "%2", "?", "~"]),
    st.text(alphabet="ab.%2eEF", max_size=6),
)
_PATHS = st.lists(_SEGMENTS, max_size=8).map(lambda segments: "/" + "/".join(segments))


@SETTINGS
@given(st.lists(_SEGMENTS, max_size=8))
def test_agrees_with_rfc_reference(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    # The reference only knows literal dots, so spell escaped dot segments literally;
    # every other segment must come through untouched either way.
    literal = "/" + "/".join(
        re.sub("%2e", ".", s, flags=re.IGNORECASE) if _is_dot_segment(s) else s for s in segments
    )
    expected = rfc3986_remove_dot_segments(literal) or "/"
    assert normalize_path(path) == expected


@SETTINGS
@given(_PATHS)
def test_idempotent(path: str) -> None:
    once = normalize_path(path)
    assert normalize_path(once) == once


@SETTINGS
@given(_PATHS)
def test_output_has_no_dot_segments_and_stays_at_root(path: str) -> None:
    result = normalize_path(path)
    assert result.startswith("/")
    assert not any(_is_dot_segment(s) for s in result.split("/"))


@SETTINGS
@given(_PATHS)
def test_keeps_encoded_slash_and_escapes(path: str) -> None:
    result = normalize_path(path)
    assert result.count("%2F") <= path.count("%2F")
    # Nothing outside dot segments is decoded or re-encoded.
    kept = [s for s in path.split("/")[1:] if not _is_dot_segment(s)]
    assert set(result.split("/")[1:]) <= {*kept, ""}


@SETTINGS
@given(st.lists(st.sampled_from(["a", "b%2Fc", "%2F", "x%2f"]), min_size=1, max_size=6))
def test_encoded_slash_is_never_a_boundary(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    assert normalize_path(path) == path
    assert normalize_path(path + "/x/..") == path + "/"
