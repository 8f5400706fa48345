"""Recurring expansions: a schedule file and ``deltamoe schedule run-due``.

A schedule is YAML (validated by pydantic)::

    timezone: UTC
    entries:
      - name: nightly-swahili
        cron: "0 2 * * *"                  # croniter syntax
        config: ../workflows/configs/demo.yaml   # relative to this file
        set: {train.steps: 200}            # optional --set overrides
        max_delay_minutes: 120             # optional: an older tick is reported missed
      - name: weekly-sweep
        cron: "0 3 * * 0"
        config: ../workflows/configs/demo.yaml
        language_sets: [[swh_Latn], [rus_Cyrl], [swh_Latn, rus_Cyrl]]   # one job per set

``run-due`` takes each entry's latest cron tick at or before ``now`` as its slot and submits it
(for a sweep, one job per language set). The slot is part of the submission id, so calling
``run-due`` again within the same slot finds the jobs already submitted and starts nothing:
cron, Airflow or a KubeRay RayCronJob may call it as often as they like. Only the latest tick
is considered: a schedule that was down for three ticks runs once, not three times.

A slot whose job FAILED is reported (the command exits non-zero, so the scheduler shows the
failure) and not retried on every poll: ``--retry-failed`` starts a new attempt, and so does a
changed checkout or config, whose submission id differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components.config import ConfigError, load_config
from workflows.submit import (
    PROJECT_ROOT,
    JobClient,
    MlflowRun,
    Plan,
    Submission,
    plan_submission,
    register_mlflow_run,
    submit,
)
from workflows.sweep import sweep_runs

__all__ = ["DueJob", "Schedule", "ScheduleEntry", "due_jobs", "failed", "latest_slot",
           "load_schedule", "run_due"]


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cron: str
    config: str = Field(min_length=1, description="run config, relative to the schedule file")
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")
    language_sets: list[list[str]] | dict[str, list[str]] | None = None
    only: list[str] = Field(default_factory=list, description="stages passed as --only")
    max_delay_minutes: int | None = Field(None, ge=1)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        if not croniter.is_valid(cron):
            raise ValueError(f"not a valid cron expression: {cron!r}")
        return cron


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = "UTC"
    entries: list[ScheduleEntry] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}") from None
        return name

    @field_validator("entries")
    @classmethod
    def _unique_names(cls, entries: list[ScheduleEntry]) -> list[ScheduleEntry]:
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"entry names listed more than once: {', '.join(dupes)}")
        return entries


def load_schedule(path: Path) -> Schedule:
    """The schedule at ``path``; ConfigError naming each bad key otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([("", "schedule file not found")], str(path)) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError([("", f"cannot read schedule: {err}")], str(path)) from None
    try:
        return Schedule.model_validate(data)
    except ValidationError as err:
        raise ConfigError([(".".join(map(str, e["loc"])), e["msg"])
                           for e in err.errors(include_url=False)], str(path)) from None


def latest_slot(cron: str, now: datetime, timezone: str = "UTC") -> datetime:
    """The latest tick of ``cron`` at or before ``now`` (a naive ``now`` is UTC)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=ZoneInfo("UTC"))
    base = now.astimezone(ZoneInfo(timezone)).replace(second=0, microsecond=0)
    return croniter(cron, base + timedelta(seconds=1)).get_prev(datetime)


@dataclass(frozen=True)
class DueJob:
    """One submission a schedule asks for now (or why it is not submitted)."""

    entry: str
    run_name: str
    slot: datetime
    config: Path
    overrides: dict[str, Any]
    run_args: tuple[str, ...]
    missed: bool = False


def due_jobs(schedule: Schedule, schedule_dir: Path, now: datetime,
             env: Mapping[str, str] | None = None) -> list[DueJob]:
    """What every entry asks for at ``now``: one job per entry, one per language set of a sweep.
    Configs are loaded (with ``env``) and validated here, so a bad entry fails before anything
    is submitted."""
    jobs: list[DueJob] = []
    issues: list[tuple[str, str]] = []
    if now.tzinfo is None:
        now = now.replace(tzinfo=ZoneInfo("UTC"))
    for i, entry in enumerate(schedule.entries):
        slot = latest_slot(entry.cron, now, schedule.timezone)
        missed = (entry.max_delay_minutes is not None
                  and now - slot > timedelta(minutes=entry.max_delay_minutes))
        config = (schedule_dir / entry.config).resolve()
        run_args = tuple(a for stage in entry.only for a in ("--only", stage))
        try:
            cfg = load_config(config, env=env, overrides=entry.overrides)
            if entry.language_sets is None:
                runs = [(cfg.run_name, dict(entry.overrides))]
            else:
                runs = [(name, {**entry.overrides, **ov})
                        for name, ov in sweep_runs(cfg, entry.language_sets)]
        except ConfigError as err:
            where = "language_sets" if err.source is None else "config"
            issues += [(f"entries.{i}.{where}",
                        f"{entry.name}: {err.source or 'language_sets'}: {path or '<root>'}: "
                        f"{msg}") for path, msg in err.issues]
            continue
        jobs += [DueJob(entry.name, name, slot, config, ov, run_args, missed)
                 for name, ov in runs]
    if issues:
        raise ConfigError(issues)
    return jobs


def run_due(schedule_path: Path, client: JobClient, now: datetime, *,
            working_dir: Path = PROJECT_ROOT, env: Mapping[str, str] | None = None,
            pip: bool = True, extra_env: Sequence[str] = (), cluster_env: Sequence[str] = (),
            retry_failed: bool = False,
            register: Callable[[Plan, str], MlflowRun | None] = register_mlflow_run,
            ) -> list[tuple[DueJob, Submission | None]]:
    """Submit every due job that was not submitted yet; (job, submission or None if missed).

    Every due job is planned (config resolved as the job will see it, storage and tracking
    checked) before the first is submitted. A slot's FAILED or STOPPED job is left as it is
    unless ``retry_failed``: its Submission has ``created`` False and that status."""
    schedule = load_schedule(schedule_path)
    resolving = {**(os.environ if env is None else env), **{n: f"${{{n}}}" for n in cluster_env}}
    due = due_jobs(schedule, schedule_path.resolve().parent, now, env=resolving)
    plans = {id(job): plan_submission(job.config, slot=job.slot, overrides=job.overrides,
                                      run_args=job.run_args, working_dir=working_dir, env=env,
                                      pip=pip, extra_env=extra_env, cluster_env=cluster_env)
             for job in due if not job.missed}
    return [(job, None if job.missed else submit(plans[id(job)], client, retry=retry_failed,
                                                  register=register))
            for job in due]


def failed(results: Sequence[tuple[DueJob, Submission | None]]) -> list[Submission]:
    """The slots' jobs that FAILED (and were not retried in this call): ``run-due`` exits
    non-zero on them. A STOPPED job was stopped on purpose and is only reported."""
    return [sub for _, sub in results if sub is not None and not sub.created
            and sub.status == "FAILED"]
