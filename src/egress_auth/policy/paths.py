"""Request-target splitting and dot-segment removal for path matching.

Rules match on the path the upstream will act on, so `..` tricks
(`/public/../admin`, `/public/%2e%2e/admin`) must resolve before matching.
Everything else is kept byte-for-byte: decoding or re-encoding other escapes
would make the proxy's view differ from what it forwards.
"""

from __future__ import annotations

import re

# Only an escaped dot is decoded, because servers resolve `%2e%2e` as `..`;
# decoding anything else (notably `%2F`) would invent segment boundaries that
# many servers do not see.
_ESCAPED_DOT = re.compile("%2e", re.IGNORECASE)


def split_target(target: str) -> tuple[str, str]:
    """Split an origin-form target into (path, query), dropping any fragment.

    The fragment is cut first: a `?` after `#` belongs to the fragment.
    """
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


def _dot_kind(segment: str) -> str | None:
    """`.` or `..` if the segment is a dot segment (escaped dots included), else None."""
    if len(segment) > 6:  # longest form is `%2e%2e`
        return None
    decoded = _ESCAPED_DOT.sub(".", segment)
    return decoded if decoded in (".", "..") else None


def normalize_path(path: str) -> str:
    """Remove dot segments (RFC 3986 section 5.2.4) from an absolute path.

    The result always starts with `/`; `..` never climbs above the root, and
    a trailing dot segment leaves a trailing slash. Repeated slashes are kept:
    servers differ on whether `//a` equals `/a` (some collapse, some treat
    the empty segment as real), so collapsing here could make a rule match a
    path the upstream resolves differently. The asterisk-form `*` is kept.
    """
    if path == "*":
        return path
    # Splitting an absolute path yields a leading empty string for the root;
    # a relative path (not valid in origin-form) is treated as if rooted.
    segments = path.split("/")
    if path.startswith("/"):
        segments = segments[1:]
    output: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        kind = _dot_kind(segment)
        if kind is None:
            output.append(segment)
            continue
        if kind == ".." and output:
            output.pop()
        if index == last:
            # `/a/b/..` names the directory `/a/`, so the slash survives.
            output.append("")
    return "/" + "/".join(output)
