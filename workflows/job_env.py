"""What environment a submitted job sees, worked out on the submitting machine.

A job's config file is shipped as is and read again on the cluster, where ``${VAR}`` resolves
against the job's environment: the cluster's own variables, overridden by the runtime env's
``env_vars``. The submitter sends the template's ``env_vars`` plus the variables of
``env_passthrough`` (and ``--env``) that are set where it runs; so it resolves the config with
exactly those, not with its whole shell, and a config that would resolve differently on the
cluster fails here, naming the variable.

Variables the cluster itself sets (a KubeRay ``secretKeyRef``, ``DELTAMOE_RUNS`` on every node)
are named with ``--cluster-env``: they are not required on the submitting machine, not sent
(so the submitter's copy of a secret never reaches Ray's job table, which keeps runtime-env
variables in clear for every dashboard user), and stay ``${VAR}`` in the submitter's view.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.config import ENV_PATTERN, SECRET_KEY, SECRET_MASK, ConfigError
from components.config.loading import parse_yaml
from components.config.names import secret_variable

__all__ = ["PROJECT_ROOT", "RUNTIME_ENV_FILE", "JobEnv", "SubmitError", "excluded", "job_env",
           "masked", "placeholder_in", "strip_userinfo"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = PROJECT_ROOT / "cluster" / "runtime_env.yaml"
PASSTHROUGH_KEY = "env_passthrough"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_UNSET = re.compile(r"^environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (unreachable cluster, config outside the working dir,
    results that would not outlive the job)."""


def excluded(rel: str, patterns: Sequence[str]) -> bool:
    """Whether the working-dir path ``rel`` matches one of the runtime env's gitignore-style
    ``excludes`` (``dir/`` matches a folder at any depth)."""
    parts = rel.split("/")
    for pattern in patterns:
        pat = pattern.rstrip("/")
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(p, pat) for p in parts[:-1]) or \
                    any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts))):
                return True
        elif fnmatch.fnmatch(parts[-1], pat) or fnmatch.fnmatch(rel, pat):
            return True
    return False


def strip_userinfo(text: str) -> str:
    """``https://user:pass@host`` → ``https://host``: a URI safe to print or store in metadata."""
    return _USERINFO.sub("", text)


def placeholder_in(value: str, names: Sequence[str] | frozenset[str]) -> bool:
    """Whether ``value`` still holds ``${NAME}`` of a variable left to the cluster."""
    return any(f"${{{name}}}" in value for name in names)


def masked(runtime_env: Mapping[str, Any], secret_names: frozenset[str] = frozenset()
           ) -> dict[str, Any]:
    """The runtime env with secret env values hidden (secret-looking names, and variables a
    secret config field reads) and credentials stripped from URIs, for printing."""
    out = dict(runtime_env)
    out["env_vars"] = {k: (SECRET_MASK if SECRET_KEY.search(k) or secret_variable(k)
                           or k in secret_names
                           else strip_userinfo(str(v)))
                       for k, v in (runtime_env.get("env_vars") or {}).items()}
    return out


def _variables(node: Any, path: str, found: dict[str, list[str]]) -> None:
    """Every ``${VAR}`` under ``node``: variable → the dotted key paths that read it."""
    if isinstance(node, dict):
        for key, value in node.items():
            _variables(value, f"{path}.{key}" if path else str(key), found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _variables(value, f"{path}.{i}", found)
    elif isinstance(node, str):
        for match in ENV_PATTERN.finditer(node):
            if match.group(1):
                found.setdefault(match.group(1), []).append(path)


def config_variables(config: Path, overrides: Mapping[str, Any]) -> dict[str, list[str]]:
    """The variables the config file and its overrides read, with the keys that read them
    (empty when the file cannot be read: loading it reports why)."""
    found: dict[str, list[str]] = {}
    try:  # bounded like load_config: an alias bomb is refused there, not walked here
        _variables(parse_yaml(config.read_text(encoding="utf-8"), str(config))[0], "", found)
    except (OSError, UnicodeDecodeError, ConfigError):
        return found
    for key, value in overrides.items():
        _variables(value, key, found)
    return found


@dataclass(frozen=True)
class JobEnv:
    """The runtime env a submission sends and the variables the job's config resolves with."""

    runtime_env: dict[str, Any]
    """As sent to Ray, secrets in clear: print :func:`masked` of it."""
    sent: dict[str, str]
    from_cluster: frozenset[str]
    unsent: frozenset[str]
    """Variables set on the submitting machine that the job will not get."""
    secret_names: frozenset[str]
    storage_vars: list[str]
    """Variables ``storage.root`` reads, for the hint of a refused root."""

    @property
    def resolving(self) -> dict[str, str]:
        """What the submitter resolves ``${VAR}`` with: the variables sent, and the cluster's
        own left as ``${VAR}`` (``re.sub`` does not rescan a replacement)."""
        return {**self.sent, **{name: f"${{{name}}}" for name in self.from_cluster}}

    def explain(self, err: ConfigError) -> ConfigError:
        """``err`` with a way out for each unset variable: send it or leave it to the cluster."""
        issues = []
        for path, message in err.issues:
            match = _UNSET.match(message)
            if match:
                name = match.group(1)
                if name in self.unsent:
                    message += (f"; it is set here but not sent to the job: pass --env {name} "
                                f"to send it, or --cluster-env {name} if the cluster sets it")
                else:
                    message += f"; or pass --cluster-env {name} if the cluster sets it"
            issues.append((path, message))
        return ConfigError(issues, err.source)


def job_env(config: Path, overrides: Mapping[str, Any], *, env: Mapping[str, str] | None,
            template: Path, pip: bool, extra_env: Sequence[str], cluster_env: Sequence[str],
            working_dir: Path) -> JobEnv:
    """The runtime env of a submission: the template with ``working_dir`` set, the variables of
    ``env_passthrough`` and ``extra_env`` copied from ``env`` when set there (but those in
    ``cluster_env``), and without the ``pip`` section when ``pip`` is False (an image that
    already holds the dependencies)."""
    bad = [n for n in [*extra_env, *cluster_env] if not _NAME.match(n)]
    if bad:
        raise SubmitError(f"not an environment variable name: {', '.join(bad)}")
    both = sorted(set(extra_env) & set(cluster_env))
    if both:
        raise SubmitError(f"{', '.join(both)}: given to --env and to --cluster-env; pass each "
                          "variable to one (--env sends yours, --cluster-env uses the cluster's)")
    try:
        data = yaml.safe_load(template.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SubmitError(f"{template}: cannot read the runtime env: {err}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{template}: expected a mapping")
    env = os.environ if env is None else env
    from_cluster = frozenset(cluster_env)
    names = [n for n in [*data.pop(PASSTHROUGH_KEY, []), *extra_env] if n not in from_cluster]
    data["working_dir"] = str(working_dir)
    env_vars = {str(k): str(v) for k, v in (data.get("env_vars") or {}).items()}
    env_vars.update({name: env[name] for name in names if env.get(name)})
    data["env_vars"] = env_vars
    if not pip:
        data.pop("pip", None)
    variables = config_variables(config, overrides)
    secret = frozenset(v for v, paths in variables.items()
                       if SECRET_KEY.search(v) or secret_variable(v)
                       or any(SECRET_KEY.search(p) or "storage_options" in p for p in paths))
    storage = [v for v, paths in variables.items() if "storage.root" in paths]
    unsent = frozenset(n for n in env if n not in env_vars)
    return JobEnv(data, dict(env_vars), from_cluster, unsent, secret, storage)
