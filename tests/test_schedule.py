"""Submission ids, runtime envs and schedules, against an in-memory job server.

The job server double keeps jobs by submission id exactly as Ray's does (``submit_job`` with a
used id raises, ``get_job_info`` of an unknown id raises a 404 error); the real server is
exercised by tests/test_submit_ray.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components.config import SECRET_MASK, ConfigError, load_config
from workflows.cli import DEMO_CONFIG
from workflows.schedule import latest_slot, load_schedule, run_due
from workflows.submit import (
    RUNTIME_ENV_FILE,
    SubmitError,
    build_runtime_env,
    masked,
    submission_id,
    submit,
)


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}

    def submit_job(self, *, entrypoint, submission_id=None, runtime_env=None, metadata=None):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.jobs[submission_id] = {"entrypoint": entrypoint, "runtime_env": runtime_env,
                                    "metadata": metadata}
        return submission_id

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError("Request failed with status code 404: Job does not exist.")
        return SimpleNamespace(status="PENDING", message="", **self.jobs[job_id])


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working dir holding the demo config and a schedule."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text(DEMO_CONFIG.read_text())
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump({
        "timezone": "UTC",
        "entries": [
            {"name": "nightly", "cron": "0 2 * * *", "config": "configs/demo.yaml",
             "set": {"train.steps": 10}, "only": ["world"]},
            {"name": "weekly-sweep", "cron": "0 3 * * 0", "config": "configs/demo.yaml",
             "language_sets": [["swh_Latn"], ["rus_Cyrl"]], "max_delay_minutes": 60},
        ]}))
    return tmp_path


def test_submission_id_is_a_function_of_config_slot_and_args() -> None:
    cfg = load_config(DEMO_CONFIG, env={})
    slot = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    sid = submission_id(cfg, slot)
    assert sid.startswith("deltamoe-demo-20260301t0200z-") and len(sid.rsplit("-", 1)[1]) == 12
    assert submission_id(load_config(DEMO_CONFIG, env={}), slot) == sid
    assert submission_id(cfg, slot.replace(hour=3)) != sid
    assert submission_id(cfg, slot, ["--only", "world"]) != sid
    other = load_config(DEMO_CONFIG, env={}, overrides={"train.steps": 61})
    assert submission_id(other, slot) != sid
    assert "-2026" not in submission_id(cfg)


def test_runtime_env_passes_env_through_and_masks_secrets(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "UNRELATED": "x", "MY_VAR": "y"}
    rt = build_runtime_env(tmp_path, env=env, extra_env=["MY_VAR"])
    assert rt["working_dir"] == str(tmp_path) and "env_passthrough" not in rt
    assert rt["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert rt["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert rt["env_vars"]["MY_VAR"] == "y" and "UNRELATED" not in rt["env_vars"]
    assert {".venv/", ".git/", "runs/", "checkpoints/", "data/",
            "benchmarks/.mergekit/"} <= set(rt["excludes"])
    assert "torch==2.13.0" in rt["pip"]["packages"]
    shown = masked(rt)
    assert shown["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_MASK
    assert shown["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "pip" not in build_runtime_env(tmp_path, env=env, pip=False)
    assert yaml.safe_load(RUNTIME_ENV_FILE.read_text())["working_dir"] == "."


def test_submit_refuses_a_config_the_cluster_would_not_see(work: Path, tmp_path: Path) -> None:
    jobs = Jobs()
    with pytest.raises(SubmitError, match="must be inside the working dir"):
        submit(DEMO_CONFIG, jobs, working_dir=work, env={})
    (work / "runs").mkdir()
    (work / "runs" / "x.yaml").write_text(DEMO_CONFIG.read_text())
    with pytest.raises(SubmitError, match="excludes"):
        submit(work / "runs" / "x.yaml", jobs, working_dir=work, env={})
    assert jobs.jobs == {}


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
    first = run_due(schedule, jobs, sunday, working_dir=work, env={})
    assert [(j.entry, j.run_name, s.created) for j, s in first] == [
        ("nightly", "demo", True), ("weekly-sweep", "demo-swh", True),
        ("weekly-sweep", "demo-rus", True)]
    nightly = jobs.jobs[first[0][1].submission_id]
    assert shlex.split(nightly["entrypoint"]) == [
        "deltamoe", "run", "configs/demo.yaml", "--set", "train.steps=10", "--only", "world"]
    assert nightly["metadata"]["deltamoe.slot"] == "20260301T0200Z"
    swh = shlex.split(jobs.jobs[first[1][1].submission_id]["entrypoint"])
    assert 'run_name="demo-swh"' in swh
    assert 'languages.new=["swh_Latn"]' in swh
    # a sweep job's overrides reproduce its run from the shipped config file
    ov = first[1][0].overrides
    assert load_config(work / "configs/demo.yaml", env={}, overrides=ov).run_name == "demo-swh"

    # later within the same slots: nothing new
    again = run_due(schedule, jobs, sunday.replace(minute=50), working_dir=work, env={})
    assert [s.created for _, s in again] == [False, False, False]
    assert [s.submission_id for _, s in again] == [s.submission_id for _, s in first]
    assert len(jobs.jobs) == 3

    # next day: the nightly slot moved on; the weekly one is more than 60 minutes old
    monday = run_due(schedule, jobs, datetime(2026, 3, 2, 2, 5, tzinfo=UTC),
                     working_dir=work, env={})
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
        run_due(sets, Jobs(), datetime(2026, 3, 1, tzinfo=UTC), working_dir=work, env={})
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
