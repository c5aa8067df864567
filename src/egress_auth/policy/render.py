"""Header value templates and header name/value checks.

Rendered values are secrets, so no exception raised here ever carries a
value: only the reason and, for templates, the template's own text offsets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_OPEN = "{{"
_CLOSE = "}}"

# `{{ .key }}` mirrors Go-template spelling users already know; the dot and
# the spaces are optional. Nothing else (pipelines, trim markers) is accepted.
_PLACEHOLDER = re.compile(r"[ \t]*\.?([A-Za-z_][A-Za-z0-9_-]*)[ \t]*")

# Any of these in a header value would let it split into a second header or
# truncate it in C-based parsers downstream.
_UNSAFE_CHARS = ("\r", "\n", "\0")

# RFC 9110 section 5.6.2 tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Headers the proxy or the HTTP framing owns: letting a template set them
# would allow request smuggling, re-routing, or spoofing the client identity.
FORBIDDEN_HEADER_NAMES: frozenset[str] = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "forwarded",
    }
)
FORBIDDEN_HEADER_PREFIXES: tuple[str, ...] = ("proxy-", "x-forwarded-")


class RenderError(Exception):
    """A template could not be rendered; carries a reason, never a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Ref:
    """A placeholder naming a key in the credential source."""

    key: str


def _has_unsafe_char(text: str) -> bool:
    return any(c in text for c in _UNSAFE_CHARS)


@dataclass(frozen=True)
class ValueTemplate:
    """A parsed template: literal text and references, in order."""

    parts: tuple[str | Ref, ...]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(p.key for p in self.parts if isinstance(p, Ref))

    def render(self, values: Mapping[str, str]) -> str:
        pieces: list[str] = []
        for part in self.parts:
            if isinstance(part, Ref):
                if part.key not in values:
                    raise RenderError(f"key {part.key!r} is not in the source")
                pieces.append(values[part.key])
            else:
                pieces.append(part)
        result = "".join(pieces)
        # Checked on the whole result, since only values can bring these in.
        if _has_unsafe_char(result):
            raise RenderError("rendered value contains CR, LF or NUL")
        return result


def _literal(text: str, offset: int) -> str:
    for index, char in enumerate(text):
        if char in _UNSAFE_CHARS:
            raise ValueError(f"literal text contains CR, LF or NUL at offset {offset + index}")
    return text


def parse_value_template(text: str) -> ValueTemplate:
    """Parse `Bearer {{ .token }}`-style text; raise ValueError naming the problem."""
    parts: list[str | Ref] = []
    position = 0
    while True:
        start = text.find(_OPEN, position)
        stray_close = text.find(_CLOSE, position, len(text) if start == -1 else start)
        if stray_close != -1:
            raise ValueError(f"unmatched '}}}}' at offset {stray_close}")
        if start == -1:
            break
        end = text.find(_CLOSE, start + len(_OPEN))
        if end == -1:
            raise ValueError(f"unmatched '{{{{' at offset {start}")
        match = _PLACEHOLDER.fullmatch(text, start + len(_OPEN), end)
        if match is None:
            raise ValueError(
                f"invalid placeholder at offset {start}: expected '{{{{ .key }}}}' "
                "with a key of letters, digits, '_' or '-'"
            )
        if start > position:
            parts.append(_literal(text[position:start], position))
        parts.append(Ref(match.group(1)))
        position = end + len(_CLOSE)
    if position < len(text):
        parts.append(_literal(text[position:], position))
    return ValueTemplate(tuple(parts))


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be set by a template, or None if it can."""
    if not name:
        return "a header name must not be empty"
    if not _TOKEN.fullmatch(name):
        return "a header name must be an RFC 9110 token"
    lowered = name.lower()
    if lowered in FORBIDDEN_HEADER_NAMES or lowered.startswith(FORBIDDEN_HEADER_PREFIXES):
        return f"header {name!r} is controlled by the proxy and cannot be set"
    return None


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as a header value, or None if it can."""
    if _has_unsafe_char(value):
        return "a header value must not contain CR, LF or NUL"
    return None
