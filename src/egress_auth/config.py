"""YAML config file -> validated models, with every problem reported at its place in the file.

Loading is three steps, each collecting all its problems before giving up:
1. parse the YAML (a file with problems: remembering the line and column of every key);
2. resolve `${env:NAME}` / `${file:PATH}` references (whole values only);
3. validate with the pydantic models, then the cross-object checks of `policy.validate`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from .model.config import ConfigFile
from .model.policy import Template
from .model.sources import CredentialSource
from .policy.validate import format_path, validate_config, validate_policy, validate_source

Loc = tuple[str | int, ...]

_REF_RE = re.compile(r"^\$\{(env|file):([^}]*)\}$")

# Loc marker for the place of a duplicated key's second copy (see `_positions`).
_DUP = "#dup"


@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str
    severity: Literal["error", "warning"] = "error"


@dataclass
class ConfigReport:
    """Problems found in one file, each printable with its line and column."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def place(self, loc: Loc) -> str:
        # The deepest part of the path that exists in the file: an unknown field's own key,
        # or the object a cross-field check complains about.
        line, col = self._line_col(loc)
        return f"{self.path}:{line}:{col}" if line else self.path

    def format(self, p: Problem) -> str:
        where = format_loc(p.loc)
        prefix = f"{self.place(p.loc)}: {p.severity}"
        return f"{prefix}: {where}: {p.message}" if where else f"{prefix}: {p.message}"

    def _line_col(self, loc: Loc) -> tuple[int, int]:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.positions:
                return self.positions[loc[:n]]
        return (0, 0)

    def lines(self, *, strict: bool = False) -> list[str]:
        """Every problem, in the order of the file."""
        out = []
        for p in sorted(self.problems, key=lambda p: self._line_col(p.loc)):
            if strict and p.severity == "warning":
                p = Problem(p.loc, p.message, "error")
            out.append(self.format(p))
        return out


class ConfigError(Exception):
    """The file cannot be used; `report` holds every problem with its place."""

    def __init__(self, report: ConfigReport) -> None:
        self.report = report
        first = report.errors[0] if report.errors else None
        super().__init__(report.format(first) if first else f"{report.path}: invalid")


def format_loc(loc: Iterable[str | int]) -> str:
    # The marker locates the second copy of a duplicated key; it is not part of the field
    # path the user wrote, so it must not show in the message.
    return format_path(tuple(part for part in loc if part != _DUP))


@dataclass
class LoadedConfig:
    config: ConfigFile
    path: Path | None
    report: ConfigReport


def _positions(
    node: yaml.Node, loc: Loc, out: dict[Loc, tuple[int, int]], problems: list[Problem]
) -> None:
    mark = node.start_mark
    out.setdefault(loc, (mark.line + 1, mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                # PyYAML silently keeps the last duplicate; a policy file must not.
                k_mark = key_node.start_mark
                out.setdefault((*loc, key, _DUP), (k_mark.line + 1, k_mark.column + 1))
                problems.append(Problem((*loc, key, _DUP), f"key {key!r} appears twice"))
            seen.add(key)
            k_mark = key_node.start_mark
            out[(*loc, key)] = (k_mark.line + 1, k_mark.column + 1)
            _positions(value_node, (*loc, key), out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, (*loc, i), out, problems)


def _resolve_refs(value: Any, loc: Loc, base: Path, problems: list[Problem]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_refs(v, (*loc, k), base, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, (*loc, i), base, problems) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        m = _REF_RE.match(value)
        if not m:
            problems.append(
                Problem(loc, "a ${env:NAME} or ${file:PATH} reference must be the whole value")
            )
            return value
        kind, name = m.groups()
        if not name:
            problems.append(Problem(loc, f"${{{kind}:}} needs a name"))
            return value
        if kind == "env":
            if name not in os.environ:
                problems.append(Problem(loc, f"environment variable {name!r} is not set"))
                return value
            return os.environ[name]
        path = Path(name)
        path = path if path.is_absolute() else base / path
        try:
            text = path.read_text()
        except OSError as e:
            problems.append(Problem(loc, f"cannot read file {str(path)!r}: {e.strerror}"))
            return value
        return text[:-1] if text.endswith("\n") else text
    return value


def _pydantic_problems(err: ValidationError, data: Any) -> list[Problem]:
    problems = []
    for e in err.errors(include_input=False, include_url=False):
        loc = _data_loc(e["loc"], data)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(Problem(loc, msg))
    return problems


def _data_loc(loc: tuple[Any, ...], data: Any) -> Loc:
    """Drop the parts pydantic adds that are not in the file (union tags such as 'http_headers')."""
    out: list[str | int] = []
    cur = data
    for part in loc:
        if (isinstance(cur, dict) and part in cur) or (
            isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        ):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and _is_field_name(part):
            # A missing or unknown field: keep its name, the place is its parent's.
            out.append(part)
            cur = None
    return tuple(out)


def _is_field_name(part: str) -> bool:
    # Union members are tagged with snake_case type names; fields are camelCase.
    return "_" not in part and not part.startswith("function-")


def _partial_checks(data: dict[str, Any]) -> list[Problem]:
    """When the file's shape is wrong somewhere, still run the cross-object checks on every
    source and template that is well-formed on its own, so one `check` reports everything."""
    found: list[Problem] = []
    sources: dict[str, CredentialSource] = {}
    broken: set[str] = set()
    raw_sources = data.get("sources")
    for i, raw in enumerate(raw_sources if isinstance(raw_sources, list) else []):
        try:
            source = CredentialSource.model_validate(raw)
        except ValidationError:
            if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                broken.add(raw["name"])
            continue
        sources[source.name] = source
        found.extend(Problem(("sources", i, *loc), msg) for loc, msg in validate_source(source))
    raw_templates = data.get("templates")
    for i, raw in enumerate(raw_templates if isinstance(raw_templates, list) else []):
        try:
            template = Template.model_validate(raw)
        except ValidationError:
            continue
        for loc, msg, sev in validate_policy(template.spec.network, sources, frozenset(broken)):
            found.append(Problem(("templates", i, "spec", "network", *loc), msg, sev))
    return found


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader semantics on libyaml's parser when PyYAML has it, remembering only whether
    some mapping repeats a key (PyYAML would silently keep the last copy)."""

    duplicated = False

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [str(k.value) for k, _ in node.value]
        if len(set(keys)) != len(keys):
            self.duplicated = True
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def load_config_text(text: str, path: str = "<config>", base: Path | None = None) -> LoadedConfig:
    """Parse and validate; every problem is reported with its line and column.

    A file without problems is read once, fast, without positions: keeping the line and
    column of every key costs seconds and hundreds of MB for a file with thousands of
    sandboxes, and they are only needed to report a problem. A file with any problem (or
    any warning) is read again with positions, and that second reading makes the report.
    """
    base = base or Path.cwd()
    loaded = _load(text, path, base, positions=False)
    if loaded is None:
        loaded = _load(text, path, base, positions=True)
    assert loaded is not None  # with positions, a problem raises instead
    return loaded


def _load(text: str, path: str, base: Path, *, positions: bool) -> LoadedConfig | None:
    """None: `positions` is off and there is something to report (read again with them)."""
    report = ConfigReport(path)
    try:
        if positions:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text) if node is not None else {}
        else:
            loader = _FastLoader(text)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
            if loader.duplicated:
                return None
            node = None
    except yaml.YAMLError as e:
        if not positions:
            return None
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            report.positions[()] = (mark.line + 1, mark.column + 1)
        report.problems.append(Problem((), f"not valid YAML: {getattr(e, 'problem', e)}"))
        raise ConfigError(report) from None
    if node is not None:
        _positions(node, (), report.positions, report.problems)
        del node
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if not positions:
            return None
        report.problems.append(Problem((), "the file must hold a mapping at the top level"))
        raise ConfigError(report)
    data = _resolve_refs(data, (), base, report.problems)
    try:
        if positions:
            config = ConfigFile.model_validate(data)
        else:
            # Through JSON, so that no object the YAML reading made outlives it: a file with
            # thousands of sandboxes peaks at ~100 MB while parsing, and CPython can hand
            # that memory back only if none of it is still in use (model strings included).
            text_json = json.dumps(data)
            del data
            config = ConfigFile.model_validate_json(text_json)
            del text_json
    except ValidationError as e:
        if not positions:
            return None
        report.problems.extend(_pydantic_problems(e, data))
        report.problems.extend(_partial_checks(data))
        raise ConfigError(report) from None
    if report.errors:
        if not positions:
            return None
        raise ConfigError(report)
    # Relative paths in the file are relative to the file's folder.
    if config.proxy.upstream_ca_file and not Path(config.proxy.upstream_ca_file).is_absolute():
        proxy = config.proxy.model_copy(
            update={"upstream_ca_file": str(base / config.proxy.upstream_ca_file)}
        )
        config = config.model_copy(update={"proxy": proxy})
    report.problems.extend(
        Problem(loc, msg, severity) for loc, msg, severity in validate_config(config)
    )
    if report.problems and not positions:
        return None
    if report.errors:
        raise ConfigError(report)
    return LoadedConfig(config, None, report)


def load_config(path: str | Path) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        report = ConfigReport(str(p), [Problem((), f"cannot read the config file: {e.strerror}")])
        raise ConfigError(report) from None
    loaded = load_config_text(text, str(p), p.resolve().parent)
    loaded.path = p
    return loaded


def default_config_path(explicit: str | None) -> Path | None:
    """`--config`, else EGRESS_AUTH_CONFIG, else config/egress-auth.yaml when present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("EGRESS_AUTH_CONFIG")
    if env:
        return Path(env)
    p = Path("config/egress-auth.yaml")
    return p if p.exists() else None
