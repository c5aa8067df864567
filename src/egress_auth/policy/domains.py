"""Host normalisation, domain patterns and an index for matching hosts to rules.

Policy patterns and request hosts go through the same `normalize_host`, so a
rule can only match when both sides agree on one canonical ASCII spelling.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from encodings import idna
from typing import Generic, TypeVar

T = TypeVar("T")

_MAX_NAME_LENGTH = 253
_MAX_LABEL_LENGTH = 63

# IDNA (RFC 3490 section 3.1) treats these as label separators too; splitting on
# them before encoding gives the same result as `str.encode("idna")`.
_LABEL_SEPARATORS = re.compile("[.\u3002\uff0e\uff61]")

# Underscore is outside the strict host-name grammar but real hosts use it
# (e.g. `_dmarc`, some CDN names), so refusing it would break real rules.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")

# A last label that looks like a number makes resolvers and URL parsers treat
# the whole name as an IPv4 address in shorthand, octal or hex (`127.1`,
# `0x7f.1`, `010.0.0.1`); ipaddress rejects those, so such names are refused
# rather than matched as names that could mean a different address.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

_WILDCARD_PREFIX = "*."


def _ip_literal(text: str) -> str | None:
    """The canonical form of an IP literal, or None if `text` is not one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone names a local interface; it has no meaning in a policy.
        raise ValueError("an IPv6 zone identifier is not allowed")
    return str(address)


def _encode_label(label: str) -> str:
    if not label:
        raise ValueError("a host name must not have an empty label")
    if label.isascii():
        encoded = label
    else:
        try:
            encoded = idna.ToASCII(label).decode("ascii")
        except UnicodeError as exc:
            raise ValueError("a label cannot be IDNA-encoded") from exc
    if len(encoded) > _MAX_LABEL_LENGTH:
        raise ValueError("a label is longer than 63 characters")
    if not _LABEL.fullmatch(encoded):
        raise ValueError(
            "a label may only hold letters, digits, '-' and '_', and must not start or end with '-'"
        )
    return encoded


def normalize_host(host: str) -> str:
    """Return the canonical ASCII form of a host name or IP literal.

    Raises ValueError with a short reason when `host` is empty or invalid.
    """
    if not host:
        raise ValueError("the host is empty")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError("brackets must enclose an IPv6 address") from None
        if address.scope_id is not None:
            raise ValueError("an IPv6 zone identifier is not allowed")
        return str(address)

    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("the host is empty")
    literal = _ip_literal(name)
    if literal is not None:
        return literal

    labels = [_encode_label(label) for label in _LABEL_SEPARATORS.split(name)]
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("a host name must not end in a numeric label")
    result = ".".join(labels)
    if len(result) > _MAX_NAME_LENGTH:
        raise ValueError("a host name is longer than 253 characters")
    return result


@dataclass(frozen=True)
class DomainPattern:
    """An exact host (`wildcard=False`) or every strict subdomain of `name`."""

    name: str
    wildcard: bool

    def matches(self, host: str) -> bool:
        """Whether the already normalised `host` is covered by this pattern."""
        if self.wildcard:
            # The leading dot keeps the match on a label boundary and excludes the apex.
            return host.endswith("." + self.name)
        return host == self.name

    def __str__(self) -> str:
        return _WILDCARD_PREFIX + self.name if self.wildcard else self.name


def parse_domain_pattern(text: str) -> DomainPattern:
    """Parse `example.com` or `*.example.com`; raise ValueError with the reason."""
    wildcard = text.startswith(_WILDCARD_PREFIX)
    name = text[len(_WILDCARD_PREFIX) :] if wildcard else text
    if "*" in name or (wildcard and not name):
        raise ValueError("a wildcard must be a leading '*.' followed by a domain")
    normalized = normalize_host(name)
    if wildcard and _ip_literal(normalized) is not None:
        raise ValueError("a wildcard cannot apply to an IP address")
    return DomainPattern(name=normalized, wildcard=wildcard)


class DomainIndex(Generic[T]):
    """Finds the entries whose domain patterns can match a host.

    Entries keep their insertion order; an entry with no patterns matches
    every host.

    Complexity: building is O(total patterns). A lookup does one dict probe
    for the host and one per proper label suffix (at most 127 for a 253-char
    name), so it is O(len(host) * labels) for hashing plus
    O(k log m) to merge the m hit lists holding k positions; it does not grow
    with the number of entries, only with the number that actually match.
    """

    def __init__(self, entries: Iterable[tuple[Sequence[DomainPattern], T]]) -> None:
        self._items: list[T] = []
        self._exact: dict[str, list[int]] = {}
        self._suffix: dict[str, list[int]] = {}
        self._always: list[int] = []
        for position, (patterns, item) in enumerate(entries):
            self._items.append(item)
            if not patterns:
                self._always.append(position)
            for pattern in patterns:
                table = self._suffix if pattern.wildcard else self._exact
                positions = table.setdefault(pattern.name, [])
                # Positions arrive in increasing order, so only the last one can repeat.
                if not positions or positions[-1] != position:
                    positions.append(position)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, host: str) -> list[T]:
        """Items whose patterns match the normalised `host`, in insertion order."""
        hits: list[list[int]] = []
        if self._always:
            hits.append(self._always)
        exact = self._exact.get(host)
        if exact:
            hits.append(exact)
        if self._suffix:
            dot = host.find(".")
            while dot != -1:
                positions = self._suffix.get(host[dot + 1 :])
                if positions:
                    hits.append(positions)
                dot = host.find(".", dot + 1)
        if len(hits) == 1:
            return [self._items[p] for p in hits[0]]
        result: list[T] = []
        previous = -1
        for position in heapq.merge(*hits):
            if position != previous:
                result.append(self._items[position])
                previous = position
        return result
