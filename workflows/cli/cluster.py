"""Cluster commands: submit a run as a Ray job, follow and stop it, schedules and sweeps."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from components.config import ConfigError, load_config
from workflows.cli.app import UserError, cli, parse_overrides


def _address_option(func: Any) -> Any:
    return click.option("--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR",
                        help="Ray job server, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS).")(func)


def _need_address(address: str | None) -> str:
    if not address:
        raise UserError("--address (or RAY_ADDRESS) is required: the Ray job server, e.g. "
                        "http://127.0.0.1:8265")
    return address


def _job_options(func: Any) -> Any:
    """What every submitting command takes: the working dir, pip, and which variables travel."""
    for option in reversed([
        click.option("--working-dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), default=None,
                     help="Folder shipped as the job's working dir (default: the project "
                          "checkout)."),
        click.option("--no-pip", is_flag=True, help="Drop the runtime env's pip section (the "
                     "image holds the dependencies)."),
        click.option("--env", "extra_env", multiple=True, metavar="NAME",
                     help="Also send this environment variable to the job when set here "
                          "(repeatable)."),
        click.option("--cluster-env", "cluster_env", multiple=True, metavar="NAME",
                     help="The cluster's own environment sets NAME (e.g. a KubeRay "
                          "secretKeyRef): ${NAME} in the config is resolved there, not "
                          "required here, and yours is not sent (repeatable)."),
    ]):
        func = option(func)
    return func


def _slot(text: str | None) -> Any:
    from datetime import datetime

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--slot {text!r}: expected an ISO date-time, e.g. 2026-01-31T02:00Z"
                        ) from None


def _client(address: str | None) -> Any:
    from workflows.submit import SubmitError, connect

    try:
        return connect(_need_address(address))
    except SubmitError as err:
        raise UserError(str(err)) from None


def _finish_wait(client: Any, sid: str) -> None:
    from workflows.submit import wait_for_job

    status = wait_for_job(client, sid, write=lambda text: click.echo(text, nl=False))
    click.echo(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


def _quick_mlflow() -> None:
    """An unreachable tracking server fails a submission in seconds, not after MLflow's
    default retries (minutes), and downloads print no progress bar into the tables; only for
    this process."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _print_plan(plan: Any) -> None:
    """A dry run: what would be sent, secrets masked."""
    import yaml

    res = plan.resources
    click.echo(f"submission id: {plan.base_id} (after a FAILED or STOPPED attempt: "
               f"{plan.base_id}-a2, -a3, ...)")
    click.echo(f"job name: {plan.cfg.run_name}")
    click.echo(f"entrypoint: {plan.entrypoint}")
    click.echo(f"entrypoint resources: num_cpus={res['entrypoint_num_cpus']} "
               f"num_gpus={res['entrypoint_num_gpus']} memory={res['entrypoint_memory']} "
               f"resources={res['entrypoint_resources'] or {}}")
    click.echo(f"code version: {plan.code_version}")
    click.echo("storage: " + (plan.storage_uri or f"{plan.cfg.storage.root}/{plan.cfg.run_name} "
                              "(resolved on the cluster)"))
    from workflows.job_env import strip_userinfo

    click.echo("tracking: " + (strip_userinfo(plan.tracking_uri) if plan.tracking_uri
                               else "decided by the cluster's MLFLOW_TRACKING_URI / tracking.uri"))
    if plan.env.from_cluster:
        click.echo(f"left to the cluster: {', '.join(sorted(plan.env.from_cluster))}")
    click.echo("runtime env:")
    text = yaml.safe_dump(plan.shown_env, sort_keys=False, allow_unicode=True)
    click.echo("".join(f"  {line}\n" for line in text.splitlines()), nl=False)


def _report(sub: Any) -> None:
    if sub.created:
        retry = f"; attempt {sub.attempt - 1} {sub.previous}" if sub.previous else ""
        click.echo(f"submitted {sub.submission_id} (attempt {sub.attempt}{retry}): "
                   f"{sub.entrypoint}")
        click.echo(f"env passed: {', '.join(sorted(sub.runtime_env['env_vars'])) or 'none'}")
        if sub.mlflow is not None:
            click.echo(f"MLflow run: {sub.mlflow.link}")
    else:
        click.echo(f"already submitted {sub.submission_id} ({sub.status}): nothing new started")


@cli.command("submit")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@_address_option
@click.option("--wait", is_flag=True, help="Stream the job's logs; exit 1 unless it succeeds.")
@click.option("--dry-run", is_flag=True, help="Print the entrypoint, runtime env (secrets "
              "masked), storage and tracking URIs; contact nothing, submit nothing.")
@click.option("--slot", default=None, metavar="ISO",
              help="Schedule slot (a cron tick): part of the submission id.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path); passed on to `deltamoe run`.")
@click.option("--from", "from_stage", default=None, metavar="STAGE",
              help="Passed on to `deltamoe run`.")
@click.option("--only", "only", multiple=True, metavar="STAGE",
              help="Passed on to `deltamoe run` (repeatable).")
@_job_options
def submit_command(config: Path, address: str | None, wait: bool, dry_run: bool,
                   slot: str | None, overrides: tuple[str, ...], from_stage: str | None,
                   only: tuple[str, ...], working_dir: Path | None, no_pip: bool,
                   extra_env: tuple[str, ...], cluster_env: tuple[str, ...]) -> None:
    """Submit `deltamoe run CONFIG` to a Ray cluster as a job.

    The submission id comes from the resolved config, --slot, --from/--only and the code
    version, so submitting the same thing again reports the existing job instead of starting
    another, unless it FAILED or was STOPPED: then a new attempt starts (<id>-a2, ...).
    storage.root must be shared storage and MLflow a tracking server: a relative root or a
    store in the run directory would stay behind in Ray's temporary working-dir copy.
    """
    from workflows.expand import select_stages
    from workflows.submit import PROJECT_ROOT, plan_submission, submit

    if from_stage and only:
        raise UserError("give --from or --only, not both")
    parsed = parse_overrides(overrides)
    run_args = [*(["--from", from_stage] if from_stage else []),
                *(a for stage in only for a in ("--only", stage))]
    with _submit_errors():
        plan = plan_submission(config, slot=_slot(slot), overrides=parsed, run_args=run_args,
                               working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                               extra_env=extra_env, cluster_env=cluster_env)
    try:
        select_stages(plan.cfg, from_stage, only)
    except ValueError as err:
        raise UserError(str(err)) from None
    if dry_run:
        click.echo("dry run: nothing submitted, nothing contacted")
        _print_plan(plan)
        return
    client = _client(address)
    _quick_mlflow()
    with _submit_errors():
        sub = submit(plan, client)
    _report(sub)
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
@click.option("--retry-failed", is_flag=True, help="Start a new attempt for a slot whose job "
              "FAILED or was STOPPED (default: report it and exit 1 for a failure).")
@_job_options
def schedule_run_due(schedule: Path, address: str | None, now_text: str | None, dry_run: bool,
                     retry_failed: bool, working_dir: Path | None, no_pip: bool,
                     extra_env: tuple[str, ...], cluster_env: tuple[str, ...]) -> None:
    """Submit what SCHEDULE has due now, skipping what was already submitted for its slot.

    Idempotent: safe to call from cron, Airflow or a KubeRay RayCronJob at any frequency. Exits
    1 when a due slot's job FAILED, so the scheduler shows it; that slot is not resubmitted on
    every call (--retry-failed does; a changed checkout or config is a new submission anyway).
    """
    from datetime import UTC, datetime

    from workflows.schedule import due_jobs, failed, load_schedule, run_due
    from workflows.submit import PROJECT_ROOT

    now = _slot(now_text) if now_text else datetime.now(UTC)
    resolving = {**os.environ, **{n: f"${{{n}}}" for n in cluster_env}}
    due = due_jobs(load_schedule(schedule), schedule.resolve().parent, now,
                   env=resolving)  # validate first
    if dry_run:
        for job in due:
            state = "missed (older than max_delay_minutes)" if job.missed else "due"
            click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()} {state}")
        return
    client = _client(address)
    _quick_mlflow()
    with _submit_errors():
        results = run_due(schedule, client, now, working_dir=working_dir or PROJECT_ROOT,
                          pip=not no_pip, extra_env=extra_env, cluster_env=cluster_env,
                          retry_failed=retry_failed)
    for job, sub in results:
        if sub is None:
            state = "missed (older than max_delay_minutes): not submitted"
        elif sub.created:
            retry = f", retrying attempt {sub.attempt - 1} ({sub.previous})" if sub.previous else ""
            state = f"submitted {sub.submission_id}{retry}"
        elif sub.status in ("FAILED", "STOPPED"):
            state = (f"{sub.status} ({sub.submission_id}): not resubmitted; --retry-failed "
                     f"starts attempt {sub.attempt + 1}")
        else:
            state = f"already submitted {sub.submission_id} ({sub.status})"
        click.echo(f"{job.entry}: {job.run_name} slot {job.slot.isoformat()}: {state}")
    bad = failed(results)
    if bad:
        click.echo(f"{len(bad)} due job(s) FAILED: {', '.join(s.submission_id for s in bad)}",
                   err=True)
        sys.exit(1)


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


def _sweep_args(language_sets: tuple[str, ...], from_stage: str | None,
                only: tuple[str, ...]) -> tuple[Any, list[str]]:
    """The language sets and the `deltamoe run` stage arguments of a sweep."""
    if from_stage and only:
        raise UserError("give --from or --only, not both")
    run_args = [*(["--from", from_stage] if from_stage else []),
                *(a for stage in only for a in ("--only", stage))]
    return _language_sets(language_sets), run_args


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
@click.option("--submit", "to_cluster", is_flag=True, help="Submit each set as its own Ray job "
              "(they run side by side) instead of running them here one after the other.")
@_address_option
@click.option("--dry-run", is_flag=True, help="With --submit: print each job; contact nothing.")
@click.option("--wait", is_flag=True, help="With --submit: wait for every job, then print "
              "the summary from MLflow; exit 1 if any failed.")
@_job_options
def sweep_command(config: Path, language_sets: tuple[str, ...], from_stage: str | None,
                  only: tuple[str, ...], overrides: tuple[str, ...], to_cluster: bool,
                  address: str | None, dry_run: bool, wait: bool, working_dir: Path | None,
                  no_pip: bool, extra_env: tuple[str, ...], cluster_env: tuple[str, ...]
                  ) -> None:
    """One expansion of CONFIG per language set (runs named <run_name>-<set>, same data
    sources), then a table comparing them. Here: one after the other, exit 1 if any failed.
    With --submit: one Ray job per set; `deltamoe sweep-summary` collects their tables."""
    from workflows.expand import select_stages
    from workflows.sweep import expand_sweep, run_sweep, sweep_summary

    sets, run_args = _sweep_args(language_sets, from_stage, only)
    if (dry_run or wait or extra_env or cluster_env or working_dir or no_pip) \
            and not to_cluster:
        raise UserError("--dry-run, --wait and the job options go with --submit")
    parsed = parse_overrides(overrides)
    resolving = {**os.environ, **{n: f"${{{n}}}" for n in cluster_env}}
    cfg = load_config(config, env=resolving, overrides=parsed)
    try:
        for run_cfg in expand_sweep(cfg, sets):  # every run's config valid before any starts
            select_stages(run_cfg, from_stage, only)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise UserError(str(err)) from None
    if to_cluster:
        _submit_sweep(config, cfg, sets, parsed, run_args, address, dry_run, wait,
                      working_dir, no_pip, extra_env, cluster_env)
        return
    runs = run_sweep(cfg, sets, from_stage=from_stage, only=only)
    for run in runs:
        if run.result is not None:
            click.echo(f"\n## {run.cfg.run_name}\n{run.result.summary()}")
    click.echo(f"\n## sweep of {cfg.run_name}: {len(runs)} runs\n{sweep_summary(runs)}")
    if any(run.error for run in runs):
        sys.exit(1)


def _submit_sweep(config: Path, cfg: Any, sets: Any, overrides: dict[str, Any],
                  run_args: list[str], address: str | None, dry_run: bool, wait: bool,
                  working_dir: Path | None, no_pip: bool, extra_env: tuple[str, ...],
                  cluster_env: tuple[str, ...]) -> None:
    """Plan every set's job (all checked before the first is submitted), then submit each."""
    from workflows.submit import PROJECT_ROOT, submit, wait_for_jobs
    from workflows.sweep import collect_sweep, plan_sweep_jobs, records_summary

    with _submit_errors():
        plans = plan_sweep_jobs(config, cfg, sets, overrides=overrides, run_args=run_args,
                                working_dir=working_dir or PROJECT_ROOT, pip=not no_pip,
                                extra_env=extra_env, cluster_env=cluster_env)
    if dry_run:
        click.echo(f"dry run: {len(plans)} jobs, nothing submitted, nothing contacted")
        for plan in plans:
            click.echo(f"\n## {plan.cfg.run_name}")
            _print_plan(plan)
        return
    client = _client(address)
    _quick_mlflow()
    subs = []
    for plan in plans:
        with _submit_errors():
            sub = submit(plan, client)
        subs.append(sub)
        click.echo(f"{plan.cfg.run_name}: ", nl=False)
        _report(sub)
    names = " ".join(f"-l {v}" for v in _language_set_args(sets))
    click.echo(f"collect: deltamoe sweep-summary {config} {names}")
    if not wait:
        return
    with _submit_errors():
        final = wait_for_jobs(client, [s.submission_id for s in subs])
    for sid, status in final.items():
        click.echo(f"job {sid}: {status}")
    tracking = plans[0].tracking_uri
    if tracking is not None:
        records = collect_sweep(tracking, cfg.tracking.experiment, cfg.run_name,
                                [p.cfg.run_name for p in plans])
        click.echo(f"\n## sweep of {cfg.run_name}: {len(plans)} jobs\n"
                   f"{records_summary(records, cfg.languages.original)}")
    if any(status != "SUCCEEDED" for status in final.values()):
        sys.exit(1)


def _language_set_args(sets: Any) -> list[str]:
    """The --languages values that name ``sets`` again (for the printed summary command)."""
    if isinstance(sets, dict):
        return [f"{name}={','.join(tags)}" for name, tags in sets.items()]
    return [",".join(tags) for tags in sets]


@cli.command("sweep-summary")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--languages", "-l", "language_sets", multiple=True, metavar="[NAME=]TAG[,TAG...]",
              help="The sweep's sets (repeatable): list these runs, also those not in MLflow "
                   "yet. Default: every run MLflow holds for this sweep.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path), as given to the sweep.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow tracking server (default: MLFLOW_TRACKING_URI, then tracking.uri).")
@click.option("--cluster-env", "cluster_env", multiple=True, metavar="NAME",
              help="A variable only the cluster sets: ${NAME} in the config is not required "
                   "here (repeatable).")
def sweep_summary_command(config: Path, language_sets: tuple[str, ...],
                          overrides: tuple[str, ...], tracking_uri: str | None,
                          cluster_env: tuple[str, ...]) -> None:
    """Collect a sweep's runs from MLflow: each finished run's evaluation table (original vs
    expanded averages per variant), the state of the others. Exit 1 if any run failed."""
    from workflows.job_env import placeholder_in
    from workflows.sweep import collect_sweep, records_summary, sweep_runs

    resolving = {**os.environ, **{n: f"${{{n}}}" for n in cluster_env}}
    cfg = load_config(config, env=resolving, overrides=parse_overrides(overrides))
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if not uri or placeholder_in(uri, cluster_env):
        raise UserError("sweep-summary reads one MLflow store: set MLFLOW_TRACKING_URI, "
                        "tracking.uri or --tracking-uri to the tracking server the jobs logged to")
    names = ([name for name, _ in sweep_runs(cfg, _language_sets(language_sets))]
             if language_sets else None)
    _quick_mlflow()
    try:
        records = collect_sweep(uri, cfg.tracking.experiment, cfg.run_name, names)
    except Exception as err:  # MLflow client errors: one line, not a traceback
        from workflows.job_env import strip_userinfo

        first = (str(err).splitlines() or [""])[0]
        raise UserError(f"cannot read MLflow at {strip_userinfo(uri)}: "
                        f"{type(err).__name__}: {strip_userinfo(first)[:300]}") from None
    click.echo(f"## sweep of {cfg.run_name}: {len(records)} runs\n"
               f"{records_summary(records, cfg.languages.original)}")
    if any(r.status == "FAILED" for r in records):
        sys.exit(1)
