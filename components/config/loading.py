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

from components.config.names import secret_variable
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
                 issues: list[tuple[str, str]], secrets: list[tuple[Any, ...]] | None = None,
                 at: tuple[Any, ...] = ()) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``.
    The key path of each string that reads a credential-named variable goes to ``secrets``."""
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, issues, secrets, (*at, k))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, _join(path, i), env, issues, secrets, (*at, i))
                for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        var, default = match.group(1), match.group(2)
        if secrets is not None and secret_variable(var) and at not in secrets:
            secrets.append(at)
        if var in env:
            return env[var]
        if default is not None:
            return default
        issues.append((path, f"environment variable {var} is not set "
                             f"(write ${{{var}:-default}} to give a default)"))
        return ""

    return ENV_PATTERN.sub(replace, node)


def _mark_secrets(cfg: BaseModel, paths: list[tuple[Any, ...]]) -> None:
    """Give each interpolated secret's key path to the innermost section holding it, whose
    JSON dump then masks it (``_Section._secret_paths``): config show, manifests, MLflow."""
    for path in paths:
        owner, rel, node = cfg, path, cfg
        for i, part in enumerate(path):
            if isinstance(node, BaseModel):
                node = getattr(node, str(part), None)
            elif isinstance(node, list | tuple) and isinstance(part, int) and part < len(node):
                node = node[part]
            elif isinstance(node, dict):
                node = node.get(part)
            else:
                break
            if isinstance(node, BaseModel):
                owner, rel = node, path[i + 1:]
        if rel and hasattr(owner, "_secret_paths"):
            owner._secret_paths = (*owner._secret_paths, rel)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


MAX_NODES = 50_000
"""Most YAML nodes a config may hold once its aliases are expanded. Anchors and aliases are
allowed (a repeated resources block is a fair use), but each alias stands for a copy of its
anchor's whole subtree wherever the loaded data is walked (interpolation, validation), so nine
nested aliases of a 285-byte file expand to gigabytes; real configs hold a few hundred nodes."""


def _expanded_size(root: yaml.Node) -> int:
    """Nodes under ``root`` counting every alias as a copy of its anchor (memoised, so a bomb is
    measured without being expanded); a recursive alias raises ValueError."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise ValueError(f"line {node.start_mark.line + 1}: an alias refers to a node that "
                             "contains it (recursive alias)")
        busy.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        busy.discard(key)
        sizes[key] = min(total, 10 * MAX_NODES)  # enough to refuse, and the sum stays small
        return sizes[key]

    return size(root)


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The data of ``text`` and each key path's 1-based line, refusing what ``yaml.safe_load``
    lets through: alias expansion past :data:`MAX_NODES` (an alias bomb) and a key given twice
    in one mapping (PyYAML keeps the last silently)."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, {}
        try:
            nodes = _expanded_size(root)
        except ValueError as err:
            raise ConfigError([("", f"invalid YAML: {err}")], source) from None
        if nodes > MAX_NODES:
            raise ConfigError([("", f"its aliases expand it past {MAX_NODES:,} YAML nodes (an "
                                    "alias bomb?); write the repeated parts out or use fewer "
                                    "nested aliases")], source)
        lines: dict[str, int] = {}
        issues: list[tuple[str, str]] = []
        _walk_lines(root, "", lines, issues)
        if issues:
            raise ConfigError(issues, source, lines)
        return loader.construct_document(root), lines
    except yaml.YAMLError as err:
        raise ConfigError([("", f"invalid YAML: {err}")], source) from None
    finally:
        loader.dispose()


def _walk_lines(node: yaml.Node, path: str, lines: dict[str, int],
                issues: list[tuple[str, str]]) -> None:
    """Key path → 1-based line of that key, so errors point into the file; a key given twice
    in one mapping is an issue at the second one's line."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                _walk_lines(value_node, path, lines, issues)
                continue
            sub = _join(path, key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in first:
                issues.append((sub, f"duplicate key (first given at line "
                                    f"{first[key_node.value]}); give each key once"))
                lines[sub] = line
                continue
            first[key_node.value] = line
            lines.setdefault(sub, line)
            _walk_lines(value_node, sub, lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = _join(path, i)
            lines[sub] = item.start_mark.line + 1
            _walk_lines(item, sub, lines, issues)


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
    secrets: list[tuple[Any, ...]] = []
    data = _interpolate(dict(data), "", os.environ if env is None else env, issues, secrets)
    if issues:
        raise ConfigError(issues, source, lines)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_issues_from(err), source, lines) from None
    _mark_secrets(cfg, secrets)
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
    data, lines = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "expected a mapping at the top level")], str(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return parse_config(data, source=str(path), env=env, lines=lines)


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

