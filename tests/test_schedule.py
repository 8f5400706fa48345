"""Schedules against an in-memory job server (tests/job_fakes.py): one submission per slot,
missed ticks, a failed slot reported with a non-zero exit and not retried on every poll."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from job_fakes import Jobs, cluster_config, no_mlflow

from components.config import ConfigError, load_config
from workflows.schedule import latest_slot, load_schedule, run_due


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working dir holding a cluster-ready demo config and a schedule."""
    cluster_config(tmp_path)
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump({
        "timezone": "UTC",
        "entries": [
            {"name": "nightly", "cron": "0 2 * * *", "config": "configs/demo.yaml",
             "set": {"train.steps": 10}, "only": ["world"]},
            {"name": "weekly-sweep", "cron": "0 3 * * 0", "config": "configs/demo.yaml",
             "language_sets": [["swh_Latn"], ["rus_Cyrl"]], "max_delay_minutes": 60},
        ]}))
    return tmp_path


def test_latest_slot() -> None:
    at = datetime(2026, 3, 2, 2, 0, 0, tzinfo=UTC)  # a Monday, on the tick
    assert latest_slot("0 2 * * *", at) == at
    assert latest_slot("0 2 * * *", at.replace(minute=59)) == at
    assert latest_slot("0 2 * * *", at.replace(hour=1)) == at.replace(day=1)
    assert latest_slot("0 3 * * 0", at) == datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    berlin = latest_slot("0 2 * * *", at, "Europe/Berlin")  # 02:00 UTC is 03:00 in Berlin
    assert berlin.astimezone(UTC) == datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


def test_run_due_submits_once_per_slot(work: Path) -> None:
    jobs = Jobs()
    schedule = work / "schedule.yaml"
    sunday = datetime(2026, 3, 1, 3, 20, tzinfo=UTC)
    first = run_due(schedule, jobs, sunday, working_dir=work, env={}, register=no_mlflow)
    assert [(j.entry, j.run_name, s.created) for j, s in first] == [
        ("nightly", "demo", True), ("weekly-sweep", "demo-swh", True),
        ("weekly-sweep", "demo-rus", True)]
    nightly = jobs.jobs[first[0][1].submission_id]
    assert shlex.split(nightly["entrypoint"]) == [
        "python", "-m", "workflows.cli", "run", "configs/demo.yaml", "--set", "train.steps=10",
        "--only", "world"]
    assert nightly["metadata"]["deltamoe.slot"] == "20260301T0200Z"
    swh = shlex.split(jobs.jobs[first[1][1].submission_id]["entrypoint"])
    assert 'run_name="demo-swh"' in swh
    assert 'languages.new=["swh_Latn"]' in swh
    # a sweep job's overrides reproduce its run from the shipped config file
    ov = first[1][0].overrides
    assert load_config(work / "configs/demo.yaml", env={}, overrides=ov).run_name == "demo-swh"

    # later within the same slots: nothing new
    again = run_due(schedule, jobs, sunday.replace(minute=50), working_dir=work, env={},
                    register=no_mlflow)
    assert [s.created for _, s in again] == [False, False, False]
    assert [s.submission_id for _, s in again] == [s.submission_id for _, s in first]
    assert len(jobs.jobs) == 3

    # next day: the nightly slot moved on; the weekly one is more than 60 minutes old
    monday = run_due(schedule, jobs, datetime(2026, 3, 2, 2, 5, tzinfo=UTC),
                     working_dir=work, env={}, register=no_mlflow)
    assert monday[0][1].created and monday[0][0].slot == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    assert [s for _, s in monday[1:]] == [None, None]  # missed, not submitted
    assert len(jobs.jobs) == 4


def test_bad_schedules_name_the_key(work: Path) -> None:
    bad = work / "bad.yaml"
    bad.write_text(yaml.safe_dump({"entries": [
        {"name": "a", "cron": "0 25 * * *", "config": "configs/demo.yaml"},
        {"name": "a", "cron": "0 1 * * *", "config": "configs/demo.yaml", "typo": 1}]}))
    with pytest.raises(ConfigError) as err:
        load_schedule(bad)
    paths = {p for p, _ in err.value.issues}
    assert {"entries.0.cron", "entries.1.typo"} <= paths, err.value.issues
    bad.write_text(yaml.safe_dump({"timezone": "Mars/Olympus", "entries": [
        {"name": "a", "cron": "0 1 * * *", "config": "configs/demo.yaml"},
        {"name": "a", "cron": "0 2 * * *", "config": "configs/demo.yaml"}]}))
    with pytest.raises(ConfigError) as err:
        load_schedule(bad)
    assert dict(err.value.issues) == {
        "timezone": "Value error, unknown time zone 'Mars/Olympus'",
        "entries": "Value error, entry names listed more than once: a"}

    sets = work / "sets.yaml"
    sets.write_text(yaml.safe_dump({"entries": [
        {"name": "s", "cron": "0 1 * * *", "config": "configs/demo.yaml",
         "language_sets": [["eng_Latn"]]}]}))
    with pytest.raises(ConfigError, match=r"already in languages\.original") as err:
        run_due(sets, Jobs(), datetime(2026, 3, 1, tzinfo=UTC), working_dir=work, env={},
                register=no_mlflow)
    assert err.value.issues[0][0] == "entries.0.language_sets"


def test_cli_run_due_dry_run_and_bad_file(work: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "workflows.cli", "schedule", "run-due"]
    dry = subprocess.run([*cmd, str(work / "schedule.yaml"), "--now", "2026-03-01T03:20",
                          "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "nightly: demo slot 2026-03-01T02:00:00+00:00 due",
        "weekly-sweep: demo-swh slot 2026-03-01T03:00:00+00:00 due",
        "weekly-sweep: demo-rus slot 2026-03-01T03:00:00+00:00 due"]
    missing = subprocess.run([*cmd, str(work / "nope.yaml")], capture_output=True, text=True,
                             env=env, timeout=120)
    assert missing.returncode == 2 and "schedule file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_run_due_exits_non_zero_on_a_failed_slot_and_retries_only_when_asked(
        work: Path, monkeypatch) -> None:
    """Through the command (in process, the job server swapped for the double): a failed slot
    exits 1 on every poll without a new attempt; --retry-failed starts one."""
    import workflows.cli.cluster as cluster_cli
    from workflows.cli import cli

    jobs = Jobs()
    monkeypatch.setattr(cluster_cli, "_client", lambda address: jobs)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "1")  # restored after the test (the command sets defaults)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["schedule", "run-due", str(work / "schedule.yaml"), "--address", "http://x:1",
            "--now", "2026-03-02T02:05", "--working-dir", str(work)]
    runner = CliRunner()
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    (sid,) = jobs.jobs  # Monday: the nightly slot only (the weekly one was missed)
    assert f"nightly: demo slot 2026-03-02T02:00:00+00:00: submitted {sid}" in first.output

    jobs.finish(sid, "FAILED")
    for _ in range(2):  # the scheduler polls again: reported, not resubmitted
        polled = runner.invoke(cli, args)
        assert polled.exit_code == 1, polled.output
        assert f"FAILED ({sid}): not resubmitted; --retry-failed starts attempt 2" \
            in polled.output
        assert list(jobs.jobs) == [sid]

    retried = runner.invoke(cli, [*args, "--retry-failed"])
    assert retried.exit_code == 0, retried.output
    assert f"submitted {sid}-a2, retrying attempt 1 (FAILED)" in retried.output
    jobs.finish(f"{sid}-a2", "SUCCEEDED")
    done = runner.invoke(cli, args)
    assert done.exit_code == 0 and f"already submitted {sid}-a2 (SUCCEEDED)" in done.output
