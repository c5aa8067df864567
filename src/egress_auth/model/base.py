"""Shared pydantic configuration for wire models: camelCase on the wire, unknown fields refused."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class WireModel(BaseModel):
    """Base of every wire object.

    `extra="forbid"` makes a misspelt field an error with its place, instead of a silently
    ignored setting; `frozen` lets compiled snapshots share model objects safely.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )


def _check_name(value: str) -> str:
    if not 1 <= len(value) <= 63 or not NAME_RE.match(value):
        raise ValueError(
            "must be 1-63 characters of lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
"""A source, binding, rule, template or sandbox name: `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, 1-63."""
