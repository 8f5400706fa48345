"""Cluster commands: submit a run as a Ray job, follow and stop it, schedules and sweeps."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from components.config import ConfigError, load_config
from workflows.cli.app import UserError, cli, parse_overrides


def _address_option(func: Any) -> Any:
    return click.option("--address", envvar="RAY_ADDRESS", required=True, metavar="ADDR",
                        help="Ray job server, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS).")(func)


def _slot(text: str | None) -> Any:
    from datetime import datetime

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--slot {text!r}: expected an ISO date-time, e.g. 2026-01-31T02:00Z"
                        ) from None


def _client(address: str) -> Any:
    from workflows.submit import SubmitError, connect

    try:
        return connect(address)
    except SubmitError as err:
        raise UserError(str(err)) from None


def _finish_wait(client: Any, sid: str) -> None:
    from workflows.submit import wait_for_job

    status = wait_for_job(client, sid, write=lambda text: click.echo(text, nl=False))
    click.echo(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


@cli.command("submit")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_address_option
@click.option("--wait", is_flag=True, help="Stream the job's logs; exit 1 unless it succeeds.")
@click.option("--slot", default=None, metavar="ISO",
              help="Schedule slot (a cron tick): part of the submission id.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path); passed on to `deltamoe run`.")
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Passed on to `deltamoe run`.")
@click.option("--only", "only", multiple=True, metavar="STAGE",
              help="Passed on to `deltamoe run` (repeatable).")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder shipped as the job's working dir (default: the "
              "project checkout).")
@click.option("--no-pip", is_flag=True,
              help="Drop the runtime env's pip section (the image holds the dependencies).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME",
              help="Also pass this environment variable to the job when set (repeatable).")
def submit_command(config: Path, address: str, wait: bool, slot: str | None,
                   overrides: tuple[str, ...], from_stage: str | None, only: tuple[str, ...],
                   working_dir: Path | None, no_pip: bool, extra_env: tuple[str, ...]) -> None:
    """Submit `deltamoe run CONFIG` to a Ray cluster as a job.

    The submission id comes from the resolved config (and --slot, --from/--only), so submitting
    the same thing again reports the existing job instead of starting another.
    """
    from workflows.expand import select_stages
    from workflows.submit import PROJECT_ROOT, SubmitError, submit

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    parsed = parse_overrides(overrides)
    cfg = load_config(config, overrides=parsed)
    try:
        select_stages(cfg, from_stage, only)
    except ValueError as err:
        raise UserError(str(err)) from None
    run_args = [*(["--from", from_stage] if from_stage else []),
                *(a for stage in only for a in ("--only", stage))]
    client = _client(address)
    try:
        sub = submit(config, client, slot=_slot(slot), overrides=parsed, run_args=run_args,
                     working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                     extra_env=extra_env)
    except SubmitError as err:
        raise UserError(str(err)) from None
    if sub.created:
        click.echo(f"submitted {sub.submission_id}: {sub.entrypoint}")
        click.echo(f"env passed: {', '.join(sorted(sub.runtime_env['env_vars'])) or 'none'}")
    else:
        click.echo(f"already submitted {sub.submission_id} ({sub.status}): nothing new started")
    if wait:
        _finish_wait(client, sub.submission_id)
    else:
        click.echo(f"follow: deltamoe logs {sub.submission_id} --address {address}")


@contextmanager
def _submit_errors() -> Iterator[None]:
    """A job-server failure as the CLI's one-line user error."""
    from workflows.submit import SubmitError

    try:
        yield
    except SubmitError as err:
        raise UserError(str(err)) from None


@cli.command("status")
@click.argument("submission_id")
@_address_option
def status_command(submission_id: str, address: str) -> None:
    """Status of a submitted job."""
    from workflows.submit import job_status

    with _submit_errors():
        info = job_status(_client(address), submission_id)
    status = getattr(info.status, "value", info.status)
    click.echo(f"{submission_id}: {status}" + (f" ({info.message})" if info.message else ""))
    click.echo(f"entrypoint: {info.entrypoint}")


@cli.command("logs")
@click.argument("submission_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends.")
def logs_command(submission_id: str, address: str, follow: bool) -> None:
    """Logs of a submitted job."""
    from workflows.submit import job_logs

    client = _client(address)
    with _submit_errors():
        if follow:
            _finish_wait(client, submission_id)
        else:
            click.echo(job_logs(client, submission_id), nl=False)


@cli.command("stop")
@click.argument("submission_id")
@_address_option
def stop_command(submission_id: str, address: str) -> None:
    """Stop a submitted job."""
    from workflows.submit import stop_job

    with _submit_errors():
        stopped = stop_job(_client(address), submission_id)
    click.echo(f"{submission_id}: " + ("stop requested" if stopped else "already ended"))


@cli.group("schedule")
def schedule_group() -> None:
    """Recurring expansions from a schedule file (cron expressions → configs or sweeps)."""


@schedule_group.command("run-due")
@click.argument("schedule", type=click.Path(dir_okay=False, path_type=Path))
@_address_option
@click.option("--now", "now_text", default=None, metavar="ISO",
              help="Evaluate the schedule at this time instead of the clock (UTC if naive).")
@click.option("--dry-run", is_flag=True, help="Print what is due; submit nothing.")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder shipped as the jobs' working dir.")
@click.option("--no-pip", is_flag=True,
              help="Drop the runtime env's pip section (the image holds the dependencies).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME",
              help="Also pass this environment variable to the jobs when set (repeatable).")
def schedule_run_due(schedule: Path, address: str, now_text: str | None, dry_run: bool,
                     working_dir: Path | None, no_pip: bool, extra_env: tuple[str, ...]) -> None:
    """Submit what SCHEDULE has due now, skipping what was already submitted for its slot.

    Idempotent: safe to call from cron, Airflow or a KubeRay RayCronJob at any frequency.
    """
    from datetime import UTC, datetime

    from workflows.schedule import due_jobs, load_schedule, run_due
    from workflows.submit import PROJECT_ROOT, SubmitError

    now = _slot(now_text) if now_text else datetime.now(UTC)
    due = due_jobs(load_schedule(schedule), schedule.resolve().parent, now)  # validate first
    if dry_run:
        for job in due:
            state = "missed (older than max_delay_minutes)" if job.missed else "due"
            click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()} {state}")
        return
    try:
        results = run_due(schedule, _client(address), now,
                          working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                          extra_env=extra_env)
    except SubmitError as err:
        raise UserError(str(err)) from None
    for job, sub in results:
        if sub is None:
            state = "missed (older than max_delay_minutes): not submitted"
        elif sub.created:
            state = f"submitted {sub.submission_id}"
        else:
            state = f"already submitted {sub.submission_id} ({sub.status})"
        click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()}: {state}")


def _language_sets(values: tuple[str, ...]) -> Any:
    """``-l swh_Latn -l east=swh_Latn,yor_Latn`` → a list of sets, or name → set when named."""
    sets = []
    for value in values:
        name, sep, tags = value.rpartition("=")
        members = [t.strip() for t in tags.split(",") if t.strip()]
        if not members or (sep and not name):
            raise UserError(f"--languages {value!r}: expected TAG[,TAG...] or NAME=TAG[,TAG...]")
        sets.append((name or None, members))
    if any(name for name, _ in sets):
        if not all(name for name, _ in sets):
            raise UserError("--languages: name every set (NAME=TAGS) or none")
        return dict(sets)
    return [members for _, members in sets]


@cli.command("sweep")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--languages", "-l", "language_sets", multiple=True, required=True,
              metavar="[NAME=]TAG[,TAG...]",
              help="One language set to add (repeatable): one expansion per set.")
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Start every run at STAGE.")
@click.option("--only", "only", multiple=True, metavar="STAGE", help="Run only STAGE.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path) of every run.")
def sweep_command(config: Path, language_sets: tuple[str, ...], from_stage: str | None,
                  only: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """One expansion of CONFIG per language set (runs named <run_name>-<set>, same data
    sources), one after the other, then a table comparing them. Exit 1 if any run failed."""
    from workflows.expand import select_stages
    from workflows.sweep import expand_sweep, run_sweep, sweep_summary

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    cfg = load_config(config, overrides=parse_overrides(overrides))
    sets = _language_sets(language_sets)
    try:
        for run_cfg in expand_sweep(cfg, sets):  # every run's config valid before any starts
            select_stages(run_cfg, from_stage, only)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise UserError(str(err)) from None
    runs = run_sweep(cfg, sets, from_stage=from_stage, only=only)
    for run in runs:
        if run.result is not None:
            click.echo(f"\n## {run.cfg.run_name}\n{run.result.summary()}")
    click.echo(f"\n## sweep of {cfg.run_name}: {len(runs)} runs\n{sweep_summary(runs)}")
    if any(run.error for run in runs):
        sys.exit(1)
