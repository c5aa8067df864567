from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_auth.policy.render import (
    FORBIDDEN_HEADER_NAMES,
    Ref,
    RenderError,
    ValueTemplate,
    header_name_problem,
    header_value_problem,
    parse_value_template,
)

SETTINGS = settings(max_examples=250, deadline=None)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", ()),
        ("plain", ("plain",)),
        ("Bearer {{ .token }}", ("Bearer ", Ref("token"))),
        ("Bearer {{.token}}", ("Bearer ", Ref("token"))),
        ("Bearer {{token}}", ("Bearer ", Ref("token"))),
        ("Bearer {{ token }}", ("Bearer ", Ref("token"))),
        ("{{ .user }}:{{ .pass }}", (Ref("user"), ":", Ref("pass"))),
        ("{{a}}{{b}}", (Ref("a"), Ref("b"))),
        ("{{ ._k-1_x }}!", (Ref("_k-1_x"), "!")),
        ("{single} braces }", ("{single} braces }",)),
        ("{{a}}}", (Ref("a"), "}")),
    ],
)
def test_parse(text: str, parts: tuple[str | Ref, ...]) -> None:
    assert parse_value_template(text).parts == parts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Bearer {{ .token", r"unmatched '\{\{' at offset 7"),
        ("Bearer .token }}", r"unmatched '\}\}' at offset 14"),
        ("{{a}} }} x", r"unmatched '\}\}' at offset 6"),
        ("x {{ }}", "invalid placeholder at offset 2"),
        ("{{ .a.b }}", "invalid placeholder at offset 0"),
        ("{{ .a | upper }}", "invalid placeholder at offset 0"),
        ("{{- .a -}}", "invalid placeholder at offset 0"),
        ("{{ 1abc }}", "invalid placeholder at offset 0"),
        ("{{ a b }}", "invalid placeholder at offset 0"),
        ("ab{{ {{a}}", "invalid placeholder at offset 2"),
        ("{{{a}}", "invalid placeholder at offset 0"),
        ("a\r\nb", "literal text contains CR, LF or NUL at offset 1"),
        ("{{a}}\n", "literal text contains CR, LF or NUL at offset 5"),
        ("x\0", "literal text contains CR, LF or NUL at offset 1"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_value_template(text)


def test_keys() -> None:
    template = parse_value_template("{{ .a }}-{{ .b }}-{{ .a }}")
    assert template.keys == frozenset({"a", "b"})
    assert parse_value_template("none").keys == frozenset()


def test_render() -> None:
    template = parse_value_template("Basic {{ .user }}:{{ .pass }}")
    assert template.render({"user": "u", "pass": "p", "extra": "x"}) == "Basic u:p"


def test_render_missing_key() -> None:
    template = parse_value_template("Bearer {{ .token }}")
    with pytest.raises(RenderError, match="key 'token' is not in the source") as info:
        template.render({"other": "s3cret"})
    assert info.value.reason == "key 'token' is not in the source"


@pytest.mark.parametrize("value", ["s3cret\r\nX-Evil: 1", "s3cret\n", "s3\0cret", "\r"])
def test_render_rejects_unsafe_value_without_leaking_it(value: str) -> None:
    template = parse_value_template("Bearer {{ .token }}")
    with pytest.raises(RenderError) as info:
        template.render({"token": value})
    assert info.value.reason == "rendered value contains CR, LF or NUL"
    assert "s3" not in str(info.value)
    assert "s3" not in repr(info.value)


@pytest.mark.parametrize(
    "name",
    ["Authorization", "X-Api-Key", "x-custom_header", "Cookie", "A!#$%&'*+-.^_`|~9", "X-Forwarded"],
)
def test_allowed_header_names(name: str) -> None:
    assert header_name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Bad Name",
        "Bad:Name",
        ":authority",
        "Näme",
        "X\r\nY",
        "Host",
        "HOST",
        "content-length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "TE",
        "Trailer",
        "Forwarded",
        "Proxy-Authorization",
        "proxy-connection",
        "X-Forwarded-For",
        "x-forwarded-host",
    ],
)
def test_rejected_header_names(name: str) -> None:
    assert header_name_problem(name) is not None


def test_forbidden_names_are_lowercase() -> None:
    assert all(n == n.lower() for n in FORBIDDEN_HEADER_NAMES)


@pytest.mark.parametrize(
    ("value", "ok"),
    [("Bearer x", True), ("", True), ("tab\tok", True), ("a\rb", False), ("a\nb", False)],
)
def test_header_value_problem(value: str, ok: bool) -> None:
    assert (header_value_problem(value) is None) is ok
    assert header_value_problem("a\0b") is not None


# --- properties -------------------------------------------------------------

_LITERAL = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="{}\r\n\0"),
    max_size=20,
)
_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,8}", fullmatch=True)
_PLACEHOLDER_STYLES = ("{{{{ .{} }}}}", "{{{{.{}}}}}", "{{{{{}}}}}", "{{{{ {} }}}}")


@SETTINGS
@given(_LITERAL)
def test_literal_round_trips(text: str) -> None:
    template = parse_value_template(text)
    assert template.keys == frozenset()
    assert template.render({}) == text


@SETTINGS
@given(
    st.lists(
        st.tuples(_LITERAL, _KEYS, st.sampled_from(_PLACEHOLDER_STYLES)),
        min_size=1,
        max_size=4,
    ),
    _LITERAL,
    st.dictionaries(_KEYS, st.text(max_size=10)),
)
def test_render_substitutes_and_never_emits_cr_lf_nul(
    pieces: list[tuple[str, str, str]], tail: str, values: dict[str, str]
) -> None:
    text = "".join(literal + style.format(key) for literal, key, style in pieces) + tail
    template = parse_value_template(text)
    keys = {key for _, key, _ in pieces}
    assert template.keys == keys
    full = {key: values.get(key, "v") for key in keys}
    expected = "".join(literal + full[key] for literal, key, _ in pieces) + tail
    try:
        rendered = template.render(full)
    except RenderError as exc:
        assert any(c in expected for c in "\r\n\0")
        assert exc.reason == "rendered value contains CR, LF or NUL"
        return
    assert rendered == expected
    assert not any(c in rendered for c in "\r\n\0")


@SETTINGS
@given(st.text(max_size=30), st.dictionaries(_KEYS, st.text(max_size=10)))
def test_any_text_parses_or_raises_value_error_and_render_is_safe(
    text: str, values: dict[str, str]
) -> None:
    try:
        template = parse_value_template(text)
    except ValueError:
        return
    assert isinstance(template, ValueTemplate)
    try:
        rendered = template.render(values)
    except RenderError:
        return
    assert not any(c in rendered for c in "\r\n\0")
