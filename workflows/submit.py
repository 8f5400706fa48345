"""Submit an expansion to a Ray cluster as a Ray job that keeps its results.

``deltamoe submit CONFIG --address ADDR`` ships the project checkout as the job's working dir
(runtime env from ``cluster/runtime_env.yaml``) and runs ``python -m workflows.cli run CONFIG``
there: the shipped code itself, so the job needs no ``deltamoe`` script on the cluster's PATH.

What the job will see is worked out on the submitting machine first (:func:`plan_submission`,
which contacts nothing): the config is resolved with exactly the variables the job gets (see
:mod:`workflows.job_env`), a relative ``storage.root`` and an MLflow store inside the run
directory are refused (on a cluster both would land in Ray's temporary copy of the working dir
and vanish with it), and the driver's entrypoint resources come from ``resources.driver``.

The submission id is ``deltamoe-<run>-[<slot>-]<hash>`` where the hash covers the resolved
config, the schedule slot, the stage selection and the code version (:func:`code_version`), so
submitting the same thing twice finds the first job, and a fixed checkout is a new submission.
A job that FAILED or was STOPPED is retried as a new attempt (``<id>-a2``, ``-a3`` ...); one
that is pending, running or succeeded is left alone. A scheduler may call it as often as it
likes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Protocol

from components.config import ConfigError, RunConfig, load_config
from components.storage import fingerprint
from workflows.job_env import (
    PROJECT_ROOT,
    RUNTIME_ENV_FILE,
    JobEnv,
    SubmitError,
    excluded,
    job_env,
    masked,
    placeholder_in,
    strip_userinfo,
)

__all__ = [
    "PROJECT_ROOT",
    "RUNTIME_ENV_FILE",
    "MlflowRun",
    "Plan",
    "Submission",
    "SubmitError",
    "attempt_id",
    "code_version",
    "connect",
    "entrypoint",
    "job_logs",
    "job_status",
    "latest_attempt",
    "masked",
    "mlflow_run_link",
    "plan_submission",
    "register_mlflow_run",
    "slot_text",
    "stop_job",
    "submission_id",
    "submit",
    "wait_for_job",
    "wait_for_jobs",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RETRIED = ("FAILED", "STOPPED")
"""Statuses whose resubmission starts a new attempt; any other status makes it a no-op."""
_CODE_DIRS = ("components", "workflows")
_NOT_CODE = ("workflows/configs/",)  # run configs enter the id as the resolved config
_SUBMISSION_TAG = "deltamoe.ray_submission_id"


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` a submission uses."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None,
                   runtime_env: dict[str, Any] | None = None,
                   metadata: dict[str, str] | None = None,
                   entrypoint_num_cpus: float | None = None,
                   entrypoint_num_gpus: float | None = None,
                   entrypoint_memory: int | None = None,
                   entrypoint_resources: dict[str, float] | None = None) -> str: ...

    def get_job_info(self, job_id: str) -> Any: ...


@dataclass(frozen=True)
class MlflowRun:
    """The expansion's MLflow parent run, created (or found) before the job starts so the job's
    metadata can link to it; the job's tracker reattaches to the same run by its run name."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def link(self) -> str:
        return mlflow_run_link(self.tracking_uri, self.experiment_id, self.run_id)


@dataclass(frozen=True)
class Plan:
    """Everything one submission sends, resolved on the submitting machine; nothing contacted."""

    cfg: RunConfig
    base_id: str
    """The first attempt's submission id; later attempts add ``-a<n>``."""
    entrypoint: str
    config_rel: str
    runtime_env: dict[str, Any]
    """As sent to Ray (secrets included): never print it, print :attr:`shown_env`."""
    env: JobEnv
    resources: dict[str, Any]
    """The entrypoint resources: ``entrypoint_num_cpus`` and friends, as submit_job takes them."""
    code_version: str
    storage_uri: str | None
    """``<storage.root>/<run>``; None when the cluster resolves it (a --cluster-env variable)."""
    tracking_uri: str | None
    """The MLflow store the job logs to; None when the cluster's environment decides it."""
    slot: str | None = None

    @property
    def shown_env(self) -> dict[str, Any]:
        """The runtime env with secrets masked: safe to print."""
        return masked(self.runtime_env, self.env.secret_names)

    def metadata(self, attempt: int, mlflow: MlflowRun | None) -> dict[str, str]:
        """Ray job metadata: ``job_name`` (the run name, which Ray's dashboard lists), the
        config, slot, code version and attempt, and the MLflow run (no credentials)."""
        out = {"job_name": self.cfg.run_name, "deltamoe.run_name": self.cfg.run_name,
               "deltamoe.config": self.config_rel, "deltamoe.code_version": self.code_version,
               "deltamoe.attempt": str(attempt)}
        if self.slot is not None:
            out["deltamoe.slot"] = self.slot
        if mlflow is not None:
            out.update({"mlflow_run": mlflow.link, "mlflow_run_id": mlflow.run_id,
                        "mlflow_experiment_id": mlflow.experiment_id,
                        "mlflow_tracking_uri": strip_userinfo(mlflow.tracking_uri)})
        return out


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    created: bool
    """False when nothing was submitted (the job exists and is not FAILED or STOPPED, or it
    failed and ``retry`` was off)."""
    status: str
    runtime_env: dict[str, Any]
    """As sent, with secrets masked (safe to print)."""
    attempt: int = 1
    previous: str | None = None
    """Status of the attempt before this one, when this is a retry."""
    mlflow: MlflowRun | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def connect(address: str) -> Any:
    """A JobSubmissionClient for ``address`` (``http://host:8265``, ``host:8265`` or ``auto``)."""
    from ray.job_submission import JobSubmissionClient

    if address != "auto" and "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {err}") from None


def slot_text(slot: datetime | None) -> str | None:
    if slot is None:
        return None
    if slot.tzinfo is None:
        slot = slot.replace(tzinfo=UTC)
    return slot.astimezone(UTC).strftime("%Y%m%dT%H%MZ")


def submission_id(cfg: RunConfig, slot: datetime | None = None, run_args: Sequence[str] = (),
                  *, code: str) -> str:
    """``deltamoe-<run>-[<slot>-]<12 hex>``: the same resolved config, slot, stage selection and
    code version always give the same id, any change gives another."""
    text = slot_text(slot)
    digest = fingerprint(cfg.model_dump(mode="json"), text, list(run_args), code)[:12]
    parts = ["deltamoe", cfg.run_name[:60]]
    if text:
        parts.append(text.lower())
    return re.sub(r"[^A-Za-z0-9_-]", "-", "-".join([*parts, digest]))


def attempt_id(base: str, attempt: int) -> str:
    """Attempt 1 is the base id, later ones add ``-a<n>``."""
    return base if attempt == 1 else f"{base}-a{attempt}"


def code_version(working_dir: Path, excludes: Sequence[str] = ()) -> str:
    """``<deltamoe version>+<12 hex>``: the package version and a hash of every file of the
    ``components`` and ``workflows`` packages (and ``pyproject.toml``) that the job imports.

    Those are the shipped copies when the working dir holds them (Ray puts the working dir first
    on the job's PYTHONPATH), else this installation's, the best guess of what the cluster has
    installed. A hash of the files rather than a git commit: what runs is what is shipped,
    committed or not, and a working dir need not be a git checkout. Run configs under
    ``workflows/configs/`` are left out: the id already covers the resolved config."""
    root = working_dir if any((working_dir / d).is_dir() for d in _CODE_DIRS) else PROJECT_ROOT
    files = [root / "pyproject.toml"] if (root / "pyproject.toml").is_file() else []
    for package in _CODE_DIRS:
        files += [p for p in (root / package).rglob("*") if p.is_file()]
    digest = hashlib.sha256()
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        if ("__pycache__" in rel.split("/") or rel.endswith(".pyc") or rel.startswith(_NOT_CODE)
                or excluded(rel, excludes)):
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        version = importlib_metadata.version("deltamoe")
    except importlib_metadata.PackageNotFoundError:
        version = "0"
    return f"{version}+{digest.hexdigest()[:12]}"


def entrypoint(config_rel: str, overrides: Mapping[str, Any] | None = None,
               run_args: Sequence[str] = ()) -> str:
    """``python -m workflows.cli run CONFIG [--set K=JSON ...] [run args]``, shell-quoted: the
    shipped code's own command line, found wherever the working dir is."""
    sets = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in (overrides or {}).items()]
    return shlex.join(["python", "-m", "workflows.cli", "run", config_rel,
                       *(a for kv in sets for a in ("--set", kv)), *run_args])


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on a tracking server (credentials stripped); for a store without a web
    server (SQLite, files) the page's path in ``mlflow ui`` over that store."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = strip_userinfo(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"{page} (mlflow ui --backend-store-uri {uri})"


def _config_in_working_dir(config: Path, working_dir: Path, excludes: Sequence[str]) -> str:
    config, working_dir = config.resolve(), working_dir.resolve()
    try:
        rel = config.relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(f"{config}: the config must be inside the working dir {working_dir} "
                          "that is shipped to the cluster (move it there or pass "
                          "--working-dir)") from None
    if excluded(rel, excludes):
        raise SubmitError(f"{config}: the config is in a path the runtime env excludes from "
                          f"the working dir ({rel}); move it elsewhere in {working_dir}")
    return rel


def _storage_uri(cfg: RunConfig, env: JobEnv) -> str | None:
    """``<root>/<run>`` as the job will write it; SubmitError when that would not outlive the
    job (a relative path lands in Ray's temporary working-dir copy, memory:// in the driver)."""
    root = cfg.storage.root
    if placeholder_in(root, env.from_cluster):
        return None
    protocol, sep, rest = root.partition("://")
    local = not sep or protocol in ("file", "local")
    path = rest if sep else root
    if protocol == "memory" and sep:
        why = "is the driver process's memory"
    elif local and not Path(path).is_absolute():
        why = "is relative: on the cluster it would be written into Ray's temporary copy of the " \
              "working dir and deleted with it"
    else:
        return f"{root.rstrip('/')}/{cfg.run_name}"
    var = env.storage_vars[0] if env.storage_vars else None
    via = f" (or {var}, which it reads)" if var else ""
    hint = f", or pass --cluster-env {var} if the cluster sets it" if var else ""
    raise SubmitError(f"storage.root {root!r} {why}; set storage.root{via} to a path every node "
                      f"shares or an object-store URI (s3://..., gs://...){hint}")


def _tracking_uri(cfg: RunConfig, env: JobEnv, storage_uri: str | None) -> str | None:
    """The MLflow store the job will log to (``MLFLOW_TRACKING_URI`` as sent, else
    ``tracking.uri``); SubmitError when it would be a file inside the run directory."""
    name = "MLFLOW_TRACKING_URI"
    if name in env.from_cluster:
        return None
    uri = env.sent.get(name) or cfg.tracking.uri
    if uri and placeholder_in(uri, env.from_cluster):
        return None
    fix = (f"set {name} (or tracking.uri) to a tracking server, e.g. http://mlflow:5000, or "
           f"pass --cluster-env {name} if the cluster sets it")
    if not uri:
        where = f" ({storage_uri}/mlflow.db)" if storage_uri else ""
        raise SubmitError(f"no MLflow tracking server: the job would keep its MLflow store in a "
                          f"SQLite file inside the run directory{where}; {fix}")
    scheme, sep, rest = uri.partition(":")
    if sep and scheme not in ("sqlite", "file"):
        return uri  # a tracking server (http, databricks, ...)
    if not sep:
        path = uri  # a bare path is MLflow's file store
    else:  # sqlite:///rel.db, sqlite:////abs.db; file:///abs
        path = rest.removeprefix("///") if scheme == "sqlite" else rest.removeprefix("//")
    if not Path(path).is_absolute():
        raise SubmitError(f"tracking store {uri!r} is a relative path: on the cluster it would "
                          f"be written into Ray's temporary copy of the working dir; {fix}")
    if storage_uri and (path == storage_uri or path.startswith(storage_uri.rstrip("/") + "/")):
        raise SubmitError(f"tracking store {uri!r} is inside the run directory {storage_uri}; "
                          f"{fix}")
    return uri


def plan_submission(config: Path, *, slot: datetime | None = None,
                    overrides: Mapping[str, Any] | None = None, run_args: Sequence[str] = (),
                    working_dir: Path = PROJECT_ROOT, env: Mapping[str, str] | None = None,
                    pip: bool = True, extra_env: Sequence[str] = (),
                    cluster_env: Sequence[str] = (),
                    template: Path = RUNTIME_ENV_FILE) -> Plan:
    """What submitting ``config`` would send, checked; reads local files and contacts nothing.

    The config is validated here (with ``overrides``) under the variables the job will get, so
    a bad config fails on the submitting machine with the usual one-line errors instead of
    minutes later on the cluster. ``cluster_env`` names variables the cluster's own environment
    sets (a KubeRay ``secretKeyRef``): they are neither required here nor sent.
    """
    jenv = job_env(config, overrides or {}, env=env, template=template, pip=pip,
                   extra_env=extra_env, cluster_env=cluster_env, working_dir=working_dir)
    try:
        cfg = load_config(config, env=jenv.resolving, overrides=overrides)
    except ConfigError as err:
        raise jenv.explain(err) from None
    excludes = jenv.runtime_env.get("excludes") or []
    rel = _config_in_working_dir(config, working_dir, excludes)
    storage = _storage_uri(cfg, jenv)
    tracking = _tracking_uri(cfg, jenv, storage)
    runtime_env = jenv.runtime_env
    if tracking is not None:  # the job tracks where this submitter checked, whatever the
        runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = tracking  # cluster's env says
    code = code_version(working_dir, excludes)
    driver = cfg.resources.driver
    resources = {"entrypoint_num_cpus": driver.num_cpus, "entrypoint_num_gpus": driver.num_gpus,
                 "entrypoint_memory": driver.memory,
                 "entrypoint_resources": dict(driver.resources) or None}
    return Plan(cfg, submission_id(cfg, slot, run_args, code=code),
                entrypoint(rel, overrides, run_args), rel, runtime_env, jenv, resources, code,
                storage, tracking, slot_text(slot))


def register_mlflow_run(plan: Plan, sid: str) -> MlflowRun | None:
    """Create (or find) the expansion's MLflow parent run, marked SCHEDULED and tagged with the
    submission id, so the job's metadata can link to it before the job starts; None when the
    cluster decides the tracking store. SubmitError when the store cannot be reached: the job
    could not log there either."""
    if plan.tracking_uri is None:
        return None
    from components.tracking import ExpansionTracker

    tags = {k: v for k, v in plan.cfg.tracking.tags.items()
            if not placeholder_in(v, plan.env.from_cluster)}
    try:
        tracker = ExpansionTracker(plan.tracking_uri, plan.cfg.tracking.experiment,
                                   plan.cfg.run_name, tags=tags)
        tracker.client.set_tag(tracker.parent_run_id, _SUBMISSION_TAG, sid)
        tracker.client.update_run(tracker.parent_run_id, status="SCHEDULED")
    except Exception as err:  # MlflowException, connection errors: one line, no traceback
        first = (str(err).splitlines() or [""])[0]
        raise SubmitError(f"cannot reach the MLflow tracking store "
                          f"{strip_userinfo(plan.tracking_uri)}: {type(err).__name__}: "
                          f"{strip_userinfo(first)[:300]}") from None
    return MlflowRun(plan.tracking_uri, tracker.experiment_id, tracker.parent_run_id)


def _status(client: Any, sid: str) -> str | None:
    """The job's status, or None when no job has this id."""
    try:
        info = client.get_job_info(sid)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            return None
        raise SubmitError(f"cannot ask the Ray job server about {sid}: {err}") from None
    return str(getattr(info.status, "value", info.status))


def latest_attempt(client: Any, base: str) -> tuple[int, str | None]:
    """(number, status) of the newest attempt of ``base``; (1, None) when there is none."""
    attempt, status = 1, _status(client, base)
    if status is None:
        return 1, None
    while (following := _status(client, attempt_id(base, attempt + 1))) is not None:
        attempt, status = attempt + 1, following
    return attempt, status


def submit(plan: Plan, client: JobClient, *, retry: bool = True,
           register: Callable[[Plan, str], MlflowRun | None] = register_mlflow_run
           ) -> Submission:
    """Submit ``plan`` unless its newest attempt is pending, running or succeeded. A FAILED or
    STOPPED newest attempt is retried as the next attempt when ``retry`` is on, else reported
    (a scheduler must not retry a broken run every time it polls)."""
    shown = plan.shown_env
    attempt, status = latest_attempt(client, plan.base_id)
    if status is not None and (status not in RETRIED or not retry):
        return Submission(attempt_id(plan.base_id, attempt), plan.entrypoint, False, status,
                          shown, attempt)
    previous = status
    if status is not None:
        attempt += 1
    sid = attempt_id(plan.base_id, attempt)
    mlflow = register(plan, sid)
    meta = plan.metadata(attempt, mlflow)
    try:
        client.submit_job(entrypoint=plan.entrypoint, submission_id=sid,
                          runtime_env=plan.runtime_env, metadata=meta, **plan.resources)
    except RuntimeError as err:
        if "already exists" in str(err):  # another submitter won the race: same job
            return Submission(sid, plan.entrypoint, False, _status(client, sid) or "PENDING",
                              shown, attempt, previous, mlflow, meta)
        raise SubmitError(f"the Ray job server refused {sid}: {err}") from None
    return Submission(sid, plan.entrypoint, True, _status(client, sid) or "PENDING", shown,
                      attempt, previous, mlflow, meta)


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


def wait_for_jobs(client: Any, sids: Sequence[str], poll: float = 2.0) -> dict[str, str]:
    """Poll until every job has ended (jobs of a sweep run side by side); id → final status."""
    final: dict[str, str] = {}
    while len(final) < len(sids):
        for sid in sids:
            if sid in final:
                continue
            status = _status(client, sid)
            if status is None:
                raise SubmitError(f"no job {sid} on this cluster")
            if status in TERMINAL:
                final[sid] = status
        if len(final) < len(sids):
            time.sleep(poll)
    return final


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
