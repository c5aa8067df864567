"""Timestamps as the store writes them: UTC, ISO 8601 with microseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def ts(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("store timestamps must be timezone-aware")
    # Fixed shape (UTC, microseconds) so values round-trip exactly and compare as text in SQL.
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)
