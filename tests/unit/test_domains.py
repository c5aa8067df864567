from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auth.policy.domains import (
    DomainIndex,
    DomainPattern,
    normalize_host,
    parse_domain_pattern,
)

SETTINGS = settings(max_examples=250, deadline=None)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("API.Example.com.", "api.example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "example.com"),
        ("a\u3002b.com", "a.b.com"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("a-b.c_d.example", "a-b.c_d.example"),
        ("10.0.0.1", "10.0.0.1"),
        ("10.0.0.1.", "10.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        ("2001:db8:0000::0001", "2001:db8::1"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "example.com..",
        "a..b",
        ".example.com",
        "-a.com",
        "a-.com",
        "a b.com",
        "a/b.com",
        "example.com:443",
        "[::1]:443",
        "[::1",
        "::1]",
        "[10.0.0.1]",
        "[fe80::1%eth0]",
        "fe80::1%eth0",
        "127.1",
        "0x7f.1",
        "010.0.0.1",
        "1.2.3.4.5",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),
        "a\u2024b.com",
        "\u200b.com",
        "*.example.com",
    ],
)
def test_normalize_host_rejects(host: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(host)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", DomainPattern("example.com", wildcard=False)),
        ("*.example.com", DomainPattern("example.com", wildcard=True)),
        ("*.Example.COM.", DomainPattern("example.com", wildcard=True)),
        ("*.bücher.de", DomainPattern("xn--bcher-kva.de", wildcard=True)),
        ("*.com", DomainPattern("com", wildcard=True)),
        ("10.0.0.1", DomainPattern("10.0.0.1", wildcard=False)),
        ("[::1]", DomainPattern("::1", wildcard=False)),
    ],
)
def test_parse_domain_pattern(text: str, expected: DomainPattern) -> None:
    assert parse_domain_pattern(text) == expected


@pytest.mark.parametrize(
    "text",
    ["*example.com", "a.*.com", "*", "*.", "**.a.com", "foo*.a.com", "*.*.a.com", "a.com*"],
)
def test_parse_domain_pattern_rejects_bad_wildcards(text: str) -> None:
    with pytest.raises(ValueError, match="a wildcard must be a leading"):
        parse_domain_pattern(text)


@pytest.mark.parametrize("text", ["", "a..com", "*.10.0.0.1", "*.[::1]", "-x.com", "a.com:80"])
def test_parse_domain_pattern_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_domain_pattern(text)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "a.example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.net", False),
        ("example.com", "badexample.com", False),
    ],
)
def test_matches(pattern: str, host: str, expected: bool) -> None:
    assert parse_domain_pattern(pattern).matches(host) is expected


def test_index_lookup_order_and_dedup() -> None:
    entries: list[tuple[list[DomainPattern], str]] = [
        ([parse_domain_pattern("*.example.com")], "wild"),
        ([], "any"),
        ([parse_domain_pattern("api.example.com")], "exact"),
        (
            [parse_domain_pattern("*.example.com"), parse_domain_pattern("*.api.example.com")],
            "both",
        ),
        ([parse_domain_pattern("other.net")], "other"),
        ([parse_domain_pattern("api.example.com")] * 2, "dup"),
    ]
    index = DomainIndex(entries)
    assert len(index) == 6
    assert index.lookup("api.example.com") == ["wild", "any", "exact", "both", "dup"]
    assert index.lookup("v1.api.example.com") == ["wild", "any", "both"]
    assert index.lookup("example.com") == ["any"]
    assert index.lookup("other.net") == ["any", "other"]
    assert DomainIndex([]).lookup("x.com") == []


# --- properties -------------------------------------------------------------

# A small label alphabet makes overlaps between patterns and hosts common.
_LABELS = st.sampled_from(["a", "b", "c", "ab", "x-y", "_s", "xn--bcher-kva", "com"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=4).map(".".join)
_PATTERNS = st.builds(DomainPattern, name=_NAMES, wildcard=st.booleans())
_ENTRIES = st.lists(st.lists(_PATTERNS, max_size=3), max_size=12)


@SETTINGS
@given(_ENTRIES, st.lists(_NAMES, min_size=1, max_size=5))
def test_index_agrees_with_brute_force(
    entries: list[list[DomainPattern]], hosts: list[str]
) -> None:
    index = DomainIndex([(patterns, i) for i, patterns in enumerate(entries)])
    for host in hosts:
        expected = [
            i
            for i, patterns in enumerate(entries)
            if not patterns or any(p.matches(host) for p in patterns)
        ]
        assert index.lookup(host) == expected


@SETTINGS
@given(_NAMES)
def test_wildcard_never_matches_apex(name: str) -> None:
    pattern = parse_domain_pattern("*." + name)
    assert not pattern.matches(normalize_host(name))
    assert pattern.matches(normalize_host("x." + name))
    assert pattern.matches(normalize_host("x.y." + name))


_MIXED_LABELS = st.one_of(
    _LABELS,
    st.text(alphabet="abcXYZ019-_", min_size=1, max_size=10).filter(
        lambda s: not s.startswith("-") and not s.endswith("-")
    ),
    st.sampled_from(["bücher", "münchen", "пример", "例え"]),
)
_MIXED_NAMES = st.lists(_MIXED_LABELS, min_size=1, max_size=4).map(".".join)


@SETTINGS
@given(_MIXED_NAMES)
def test_case_and_trailing_dot_invariance(name: str) -> None:
    try:
        expected = normalize_host(name)
    except ValueError:
        # e.g. a numeric last label; the variants must be rejected as well.
        for variant in (name.upper(), name + "."):
            with pytest.raises(ValueError):
                normalize_host(variant)
        return
    assert normalize_host(name.upper()) == expected
    assert normalize_host(name + ".") == expected
    assert normalize_host(name.upper() + ".") == expected
    assert normalize_host(expected) == expected  # idempotent
    assert expected.isascii()
    assert expected == expected.lower()


@SETTINGS
@given(_MIXED_NAMES, st.booleans())
def test_pattern_matching_is_case_and_dot_invariant(name: str, wildcard: bool) -> None:
    text = ("*." if wildcard else "") + name
    try:
        pattern = parse_domain_pattern(text)
    except ValueError:
        return
    assert parse_domain_pattern(text.upper() + ".") == pattern
    host = ("sub." if wildcard else "") + name
    assert pattern.matches(normalize_host(host.upper() + "."))
