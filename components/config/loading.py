"""Loading a run config: YAML with ``${VAR}`` interpolation, validation, errors that name the
key and its line, and the resolved config back as YAML."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from components.config.schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot be used; ``issues`` holds ``(key path, message)`` pairs."""

    def __init__(self, issues: list[tuple[str, str]], source: str | None = None,
                 lines: Mapping[str, int] | None = None) -> None:
        self.issues = issues
        self.source = source
        rendered = []
        for path, message in issues:
            where = source or "<config>"
            line = (lines or {}).get(path)
            prefix = f"{where}:{line}" if line else where
            rendered.append(f"{prefix}: {path or '<root>'}: {message}")
        super().__init__("\n".join(rendered))


# --------------------------------------------------------------------------- loading

ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _interpolate(node: Any, path: str, env: Mapping[str, str],
                 issues: list[tuple[str, str]]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, issues) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, _join(path, i), env, issues) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        var, default = match.group(1), match.group(2)
        if var in env:
            return env[var]
        if default is not None:
            return default
        issues.append((path, f"environment variable {var} is not set "
                             f"(write ${{{var}:-default}} to give a default)"))
        return ""

    return ENV_PATTERN.sub(replace, node)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _yaml_lines(text: str) -> dict[str, int]:
    """Key path → 1-based line of that key, so errors point into the file."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = _join(path, key_node.value)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = _join(path, i)
                lines[sub] = item.start_mark.line + 1
                walk(item, sub)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section found at ``loc``, to suggest the key a typo meant."""
    candidates: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for cand in candidates:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                field = cand.model_fields.get(str(part))
                if field is not None:
                    nxt.extend(_unwrap(field.annotation))
            elif typing.get_origin(cand) in (list, dict):
                nxt.extend(_unwrap(typing.get_args(cand)[-1]))
        candidates = nxt
    names: list[str] = []
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            names.extend(cand.model_fields)
    return names


def _issues_from(err: ValidationError) -> list[tuple[str, str]]:
    issues = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        path = ".".join(str(p) for p in loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            known = _fields_at(RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else \
                (f"; known keys: {', '.join(known)}" if known else "")
            issues.append((path, f"unknown key{hint}"))
        elif kind == "missing":
            issues.append((path, "required key is missing"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e.get("input")
            plain = not isinstance(shown, dict | list)
            if kind not in ("value_error", "assertion_error") and plain:
                msg = f"{msg} (got {shown!r})"
            issues.append((path, msg))
    return issues


def parse_config(data: Mapping[str, Any], *, source: str | None = None,
                 env: Mapping[str, str] | None = None,
                 lines: Mapping[str, int] | None = None) -> RunConfig:
    """Validate already-parsed YAML data (after ``${ENV}`` interpolation) into a RunConfig."""
    if not isinstance(data, Mapping):
        raise ConfigError([("", f"expected a mapping at the top level, got {type(data).__name__}")],
                          source)
    issues: list[tuple[str, str]] = []
    data = _interpolate(dict(data), "", os.environ if env is None else env, issues)
    if issues:
        raise ConfigError(issues, source, lines)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_issues_from(err), source, lines) from None
    issues = cfg.cross_section_issues()
    if issues:
        raise ConfigError(issues, source, lines)
    return cfg


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a run config from YAML; ``overrides`` are dotted keys (``train.steps``) set on top."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", "config file not found")], str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([("", f"cannot read config: {err}")], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([("", f"invalid YAML: {err}")], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "expected a mapping at the top level")], str(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_config(data, source=str(path), env=env, lines=_yaml_lines(text))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def dump_config(cfg: RunConfig) -> str:
    """The resolved config (defaults filled in, secrets masked) as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

