"""Submit an expansion to a Ray cluster as a Ray job: idempotent, observable, stoppable.

``deltamoe submit CONFIG --address ADDR`` ships the project checkout as the job's working dir
(runtime env from ``cluster/runtime_env.yaml``) and runs ``deltamoe run CONFIG`` on the cluster.
The submission id is derived from the resolved config's fingerprint (plus the schedule slot and
the stage selection), so submitting the same thing twice finds the first job instead of starting
a second one: a scheduler (cron, Airflow, a KubeRay RayCronJob) can call it as often as it likes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from components.config import SECRET_KEY, SECRET_MASK, RunConfig, load_config
from components.storage import fingerprint

__all__ = [
    "PROJECT_ROOT",
    "RUNTIME_ENV_FILE",
    "Submission",
    "SubmitError",
    "build_runtime_env",
    "connect",
    "entrypoint",
    "job_logs",
    "job_status",
    "masked",
    "stop_job",
    "submission_id",
    "submit",
    "wait_for_job",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = PROJECT_ROOT / "cluster" / "runtime_env.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_PASSTHROUGH_KEY = "env_passthrough"


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (unreachable cluster, config outside the working dir)."""


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` a submission uses."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None,
                   runtime_env: dict[str, Any] | None = None,
                   metadata: dict[str, str] | None = None) -> str: ...

    def get_job_info(self, job_id: str) -> Any: ...


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    created: bool
    """False when a job with this id already existed: nothing was submitted."""
    status: str
    runtime_env: dict[str, Any]
    """As sent, with secret-looking values masked (safe to print)."""


def connect(address: str) -> Any:
    """A JobSubmissionClient for ``address`` (``http://host:8265``, ``host:8265`` or ``auto``)."""
    from ray.job_submission import JobSubmissionClient

    if address != "auto" and "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {err}") from None


def _slot_text(slot: datetime | None) -> str | None:
    if slot is None:
        return None
    if slot.tzinfo is None:
        slot = slot.replace(tzinfo=UTC)
    return slot.astimezone(UTC).strftime("%Y%m%dT%H%MZ")


def submission_id(cfg: RunConfig, slot: datetime | None = None,
                  run_args: Sequence[str] = ()) -> str:
    """``deltamoe-<run>-[<slot>-]<12 hex>``: the same resolved config, slot and stage selection
    always give the same id, any change gives another."""
    slot_text = _slot_text(slot)
    digest = fingerprint(cfg.model_dump(mode="json"), slot_text, list(run_args))[:12]
    parts = ["deltamoe", cfg.run_name[:60]]
    if slot_text:
        parts.append(slot_text.lower())
    return re.sub(r"[^A-Za-z0-9_-]", "-", "-".join([*parts, digest]))


def entrypoint(config_rel: str, overrides: Mapping[str, Any] | None = None,
               run_args: Sequence[str] = ()) -> str:
    """``deltamoe run CONFIG [--set K=JSON ...] [run args]``, shell-quoted."""
    sets = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in (overrides or {}).items()]
    return shlex.join(["deltamoe", "run", config_rel, *(a for kv in sets
                                                         for a in ("--set", kv)), *run_args])


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
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


def build_runtime_env(working_dir: Path, *, env: Mapping[str, str] | None = None,
                      template: Path = RUNTIME_ENV_FILE, pip: bool = True,
                      extra_env: Sequence[str] = ()) -> dict[str, Any]:
    """The runtime env of a submission: the template with ``working_dir`` set, the variables of
    ``env_passthrough`` (and ``extra_env``) copied from ``env`` when set there, and without the
    ``pip`` section when ``pip`` is False (an image that already holds the dependencies)."""
    try:
        data = yaml.safe_load(template.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SubmitError(f"{template}: cannot read the runtime env: {err}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"{template}: expected a mapping")
    env = os.environ if env is None else env
    names = [*data.pop(_PASSTHROUGH_KEY, []), *extra_env]
    data["working_dir"] = str(working_dir)
    env_vars = {str(k): str(v) for k, v in (data.get("env_vars") or {}).items()}
    env_vars.update({name: env[name] for name in names if env.get(name)})
    data["env_vars"] = env_vars
    if not pip:
        data.pop("pip", None)
    return data


def masked(runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime env with secret-looking env values hidden, for printing and metadata."""
    out = dict(runtime_env)
    out["env_vars"] = {k: (SECRET_MASK if SECRET_KEY.search(k) else v)
                       for k, v in (runtime_env.get("env_vars") or {}).items()}
    return out


def _config_in_working_dir(config: Path, working_dir: Path, excludes: Sequence[str]) -> str:
    config, working_dir = config.resolve(), working_dir.resolve()
    try:
        rel = config.relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(f"{config}: the config must be inside the working dir {working_dir} "
                          "that is shipped to the cluster (move it there or pass "
                          "--working-dir)") from None
    if _excluded(rel, excludes):
        raise SubmitError(f"{config}: the config is in a path the runtime env excludes from "
                          f"the working dir ({rel}); move it elsewhere in {working_dir}")
    return rel


def _status(client: Any, sid: str) -> str | None:
    """The job's status, or None when no job has this id."""
    try:
        info = client.get_job_info(sid)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            return None
        raise SubmitError(f"cannot ask the Ray job server about {sid}: {err}") from None
    return str(getattr(info.status, "value", info.status))


def submit(config: Path, client: JobClient, *, slot: datetime | None = None,
           overrides: Mapping[str, Any] | None = None, run_args: Sequence[str] = (),
           working_dir: Path = PROJECT_ROOT, env: Mapping[str, str] | None = None,
           pip: bool = True, extra_env: Sequence[str] = (),
           template: Path = RUNTIME_ENV_FILE) -> Submission:
    """Submit ``deltamoe run CONFIG`` unless a job with its submission id exists already.

    The config is validated here first (with ``overrides``), so a bad config fails on the
    submitting machine with the usual one-line errors instead of minutes later on the cluster.
    """
    cfg = load_config(config, env=env, overrides=overrides)
    runtime_env = build_runtime_env(working_dir, env=env, template=template, pip=pip,
                                    extra_env=extra_env)
    rel = _config_in_working_dir(config, working_dir, runtime_env.get("excludes") or [])
    sid = submission_id(cfg, slot, run_args)
    command = entrypoint(rel, overrides, run_args)
    shown = masked(runtime_env)
    status = _status(client, sid)
    if status is not None:
        return Submission(sid, command, False, status, shown)
    metadata = {"deltamoe.run_name": cfg.run_name, "deltamoe.config": rel}
    if slot is not None:
        metadata["deltamoe.slot"] = _slot_text(slot) or ""
    try:
        client.submit_job(entrypoint=command, submission_id=sid, runtime_env=runtime_env,
                          metadata=metadata)
    except RuntimeError as err:
        if "already exists" in str(err):  # another submitter won the race: same job
            return Submission(sid, command, False, _status(client, sid) or "PENDING", shown)
        raise SubmitError(f"the Ray job server refused {sid}: {err}") from None
    return Submission(sid, command, True, _status(client, sid) or "PENDING", shown)


def wait_for_job(client: Any, sid: str, write: Callable[[str], Any] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends; its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # the log stream closed early: fall back to polling
        write(f"[log stream interrupted: {err}]\n")
    while (status := _status(client, sid)) not in TERMINAL:
        if status is None:
            raise SubmitError(f"no job {sid} on this cluster")
        time.sleep(1.0)
    return status


def job_status(client: Any, sid: str) -> Any:
    """The JobDetails of ``sid``; SubmitError when there is none."""
    if _status(client, sid) is None:
        raise SubmitError(f"no job {sid} on this cluster")
    return client.get_job_info(sid)


def job_logs(client: Any, sid: str) -> str:
    if _status(client, sid) is None:
        raise SubmitError(f"no job {sid} on this cluster")
    return client.get_job_logs(sid)


def stop_job(client: Any, sid: str) -> bool:
    """Ask the cluster to stop ``sid``; False when it had already ended."""
    status = _status(client, sid)
    if status is None:
        raise SubmitError(f"no job {sid} on this cluster")
    if status in TERMINAL:
        return False
    return bool(client.stop_job(sid))
