"""What a submission sends, worked out before anything is contacted: refusals of results that
would not outlive the job, variables left to the cluster, the code version in the id, attempts,
metadata and entrypoint resources (against the in-memory job server of job_fakes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from job_fakes import Jobs, cluster_config, no_mlflow

from components.config import SECRET_MASK, ConfigError, load_config
from workflows.cli import DEMO_CONFIG
from workflows.submit import (
    PROJECT_ROOT,
    SubmitError,
    code_version,
    mlflow_run_link,
    plan_submission,
    submission_id,
    submit,
)

ENV = {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}


@pytest.fixture
def listener() -> Iterator[tuple[int, object]]:
    """A loopback port that records whether anyone connected (the kernel completes the
    handshake of a connection that was never accepted, so it is found afterwards)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)

    def contacted() -> bool:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return False
        return True

    yield sock.getsockname()[1], contacted
    sock.close()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DELTAMOE_RUNS", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, env={**base, **env}, timeout=300)


def test_dry_run_refuses_the_demo_configs_relative_storage_root(listener) -> None:
    port, contacted = listener
    address = {"RAY_ADDRESS": f"http://127.0.0.1:{port}"}
    for extra in (["--dry-run"], []):  # a real submission refuses before it connects, too
        proc = _cli(["submit", "workflows/configs/demo.yaml", *extra], address)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        line, = proc.stderr.strip().splitlines()
        assert line.startswith("Error: storage.root 'runs' is relative: on the cluster it would "
                               "be written into Ray's temporary copy of the working dir")
        assert "set storage.root (or DELTAMOE_RUNS, which it reads) to a path every node " \
               "shares or an object-store URI" in line
        assert "--cluster-env DELTAMOE_RUNS" in line
    assert not contacted()

    shared = {**address, "DELTAMOE_RUNS": "/mnt/deltamoe/runs"}
    proc = _cli(["submit", "workflows/configs/demo.yaml", "--dry-run"], shared)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "no MLflow tracking server" in line and "/mnt/deltamoe/runs/demo/mlflow.db" in line
    assert "set MLFLOW_TRACKING_URI (or tracking.uri) to a tracking server" in line
    assert not contacted()


def test_dry_run_prints_what_would_be_sent_with_secrets_masked(listener) -> None:
    port, contacted = listener
    env = {"RAY_ADDRESS": f"http://127.0.0.1:{port}", "DELTAMOE_RUNS": "/mnt/deltamoe/runs",
           "MLFLOW_TRACKING_URI": f"http://alice:pa55word@127.0.0.1:{port}",
           "MLFLOW_TRACKING_PASSWORD": "hunter2-secret", "HF_TOKEN": "hf_very_secret"}
    proc = _cli(["submit", "workflows/configs/demo.yaml", "--dry-run", "--only", "world",
                 "--cluster-env", "AWS_SECRET_ACCESS_KEY"], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for secret in ("hunter2", "hf_very_secret", "pa55word", "alice"):
        assert secret not in out + proc.stderr
    head, _, shown = out.partition("runtime env:\n")
    assert "dry run: nothing submitted, nothing contacted" in head
    assert "entrypoint: python -m workflows.cli run workflows/configs/demo.yaml --only world" \
        in head
    assert "storage: /mnt/deltamoe/runs/demo\n" in head
    assert f"tracking: http://127.0.0.1:{port}\n" in head
    assert "entrypoint resources: num_cpus=1.0 num_gpus=0.0" in head
    assert "left to the cluster: AWS_SECRET_ACCESS_KEY" in head
    runtime_env = yaml.safe_load(shown)
    assert runtime_env["working_dir"] == str(PROJECT_ROOT)
    assert "torch==2.13.0" in runtime_env["pip"]["packages"]
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == SECRET_MASK
    assert runtime_env["env_vars"]["HF_TOKEN"] == SECRET_MASK
    assert runtime_env["env_vars"]["DELTAMOE_RUNS"] == "/mnt/deltamoe/runs"
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
    assert not contacted()


@pytest.mark.parametrize("root, tracking, message", [
    ("runs", "http://mlflow:5000", "storage.root 'runs' is relative"),
    ("~/runs", "http://mlflow:5000", "is relative"),
    ("memory://runs", "http://mlflow:5000", "is the driver process's memory"),
    ("{tmp}/runs", None, "no MLflow tracking server"),
    ("{tmp}/runs", "sqlite:///mlflow.db", "'sqlite:///mlflow.db' is a relative path"),
    ("{tmp}/runs", "mlruns", "is a relative path"),
    ("{tmp}/runs", "sqlite:///{tmp}/runs/demo/mlflow.db", "inside the run directory"),
    ("{tmp}/runs", "file://{tmp}/runs/demo/mlruns", "inside the run directory"),
])
def test_results_that_would_not_outlive_the_job_are_refused(tmp_path: Path, root: str,
                                                            tracking: str | None,
                                                            message: str) -> None:
    fill = {"tmp": str(tmp_path)}
    config = cluster_config(tmp_path)
    overrides = {"storage.root": root.format(**fill), "tracking.uri": None}
    if tracking:
        overrides["tracking.uri"] = tracking.format(**fill)
    with pytest.raises(SubmitError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        plan_submission(config, overrides=overrides, working_dir=tmp_path, env={})
    assert "\n" not in str(err.value)


def test_shared_storage_and_a_tracking_server_are_accepted(tmp_path: Path) -> None:
    config = cluster_config(tmp_path)
    plan = plan_submission(config, overrides={"storage.root": "s3://bucket/runs"},
                           working_dir=tmp_path, env=ENV)
    assert plan.storage_uri == "s3://bucket/runs/demo"
    assert plan.tracking_uri == ENV["MLFLOW_TRACKING_URI"]  # the variable wins, as on the job
    sqlite = plan_submission(config, working_dir=tmp_path, env={})
    assert sqlite.tracking_uri == f"sqlite:///{tmp_path}/shared/mlflow.db"
    # the job is told where the submitter checked, whatever the cluster's own env says
    assert sqlite.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == sqlite.tracking_uri
    assert sqlite.entrypoint == "python -m workflows.cli run configs/demo.yaml"


def test_variables_left_to_the_cluster(tmp_path: Path) -> None:
    """``${VAR}`` of a --cluster-env variable is resolved on the cluster (a KubeRay
    secretKeyRef): not required here, not sent even when set here; other variables must be
    sent for the config to resolve here as it will there."""
    config = cluster_config(tmp_path)
    text = yaml.safe_load(config.read_text())
    text["storage"] = {"root": "${SHARED_RUNS}", "storage_options": {"token": "${HF_TOKEN}"}}
    config.write_text(yaml.safe_dump(text))
    env = {**ENV, "HF_TOKEN": "hf_mine", "SHARED_RUNS": "/mnt/mine"}

    with pytest.raises(ConfigError) as err:
        plan_submission(config, working_dir=tmp_path, env=env)
    assert "environment variable SHARED_RUNS is not set" in str(err.value)
    assert "set here but not sent to the job: pass --env SHARED_RUNS to send it, or " \
           "--cluster-env SHARED_RUNS if the cluster sets it" in str(err.value)

    plan = plan_submission(config, working_dir=tmp_path, env=env,
                           cluster_env=["SHARED_RUNS", "HF_TOKEN"])
    assert plan.storage_uri is None and plan.cfg.storage.root == "${SHARED_RUNS}"
    assert plan.cfg.storage.storage_options == {"token": "${HF_TOKEN}"}
    assert "HF_TOKEN" not in plan.runtime_env["env_vars"]  # passthrough, but the cluster's
    assert "SHARED_RUNS" not in plan.runtime_env["env_vars"]

    sent = plan_submission(config, working_dir=tmp_path, env=env, extra_env=["SHARED_RUNS"])
    assert sent.storage_uri == "/mnt/mine/demo"
    assert sent.runtime_env["env_vars"]["HF_TOKEN"] == "hf_mine"
    assert sent.shown_env["env_vars"]["HF_TOKEN"] == SECRET_MASK

    with pytest.raises(SubmitError, match="given to --env and to --cluster-env"):
        plan_submission(config, working_dir=tmp_path, env=env, extra_env=["X"],
                        cluster_env=["X"])
    with pytest.raises(ConfigError, match="--cluster-env SHARED_RUNS if the cluster sets it"):
        plan_submission(config, working_dir=tmp_path, env=ENV)


def test_a_variable_read_by_a_secret_key_is_masked_whatever_its_name(tmp_path: Path) -> None:
    config = cluster_config(tmp_path)
    text = yaml.safe_load(config.read_text())
    text["storage"]["storage_options"] = {"secret": "${S3_S}"}
    config.write_text(yaml.safe_dump(text))
    plan = plan_submission(config, working_dir=tmp_path, env={"S3_S": "abc"},
                           extra_env=["S3_S"])
    assert plan.runtime_env["env_vars"]["S3_S"] == "abc"
    assert plan.shown_env["env_vars"]["S3_S"] == SECRET_MASK


def test_submission_id_is_a_function_of_config_slot_args_and_code() -> None:
    cfg = load_config(DEMO_CONFIG, env={})
    slot = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    sid = submission_id(cfg, slot, code="0.1.0+a")
    assert sid.startswith("deltamoe-demo-20260301t0200z-") and len(sid.rsplit("-", 1)[1]) == 12
    assert submission_id(load_config(DEMO_CONFIG, env={}), slot, code="0.1.0+a") == sid
    assert submission_id(cfg, slot, code="0.1.0+b") != sid
    assert submission_id(cfg, slot.replace(hour=3), code="0.1.0+a") != sid
    assert submission_id(cfg, slot, ["--only", "world"], code="0.1.0+a") != sid
    other = load_config(DEMO_CONFIG, env={}, overrides={"train.steps": 61})
    assert submission_id(other, slot, code="0.1.0+a") != sid
    assert "-2026" not in submission_id(cfg, code="0.1.0+a")


def test_code_version_is_the_shipped_source(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "components").mkdir(parents=True)
    (work / "workflows" / "configs").mkdir(parents=True)
    (work / "workflows" / "__pycache__").mkdir()
    (work / "components" / "a.py").write_text("A = 1\n")
    (work / "workflows" / "b.py").write_text("B = 1\n")
    (work / "workflows" / "configs" / "x.yaml").write_text("run_name: x\n")
    first = code_version(work, ["*.db"])
    assert first.split("+")[0] == code_version(PROJECT_ROOT).split("+")[0]  # package version
    (work / "workflows" / "configs" / "x.yaml").write_text("run_name: y\n")  # in the id already
    (work / "workflows" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0")
    (work / "workflows" / "state.db").write_bytes(b"\0")  # excluded from the working dir
    assert code_version(work, ["*.db"]) == first
    (work / "components" / "a.py").write_text("A = 2\n")  # the fix
    assert code_version(work, ["*.db"]) != first
    # a working dir without the packages runs the installed ones
    assert code_version(tmp_path / "configs_only") == code_version(PROJECT_ROOT)


def test_a_changed_checkout_is_a_new_submission(tmp_path: Path) -> None:
    config = cluster_config(tmp_path)
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "stage.py").write_text("def run(): raise RuntimeError\n")
    before = plan_submission(config, working_dir=tmp_path, env={})
    (tmp_path / "workflows" / "stage.py").write_text("def run(): return 1\n")
    after = plan_submission(config, working_dir=tmp_path, env={})
    assert before.base_id != after.base_id and before.code_version != after.code_version
    jobs = Jobs()
    first = submit(before, jobs, register=no_mlflow)
    jobs.finish(first.submission_id, "FAILED")
    fixed = submit(after, jobs, register=no_mlflow)
    assert fixed.created and fixed.submission_id == after.base_id and fixed.attempt == 1


def test_failed_or_stopped_jobs_get_a_new_attempt_others_are_a_no_op(tmp_path: Path) -> None:
    plan = plan_submission(cluster_config(tmp_path), working_dir=tmp_path, env={})
    jobs = Jobs()
    first = submit(plan, jobs, register=no_mlflow)
    assert first.created and first.submission_id == plan.base_id and first.attempt == 1
    for status in ("PENDING", "RUNNING"):
        jobs.finish(plan.base_id, status)
        again = submit(plan, jobs, register=no_mlflow)
        assert not again.created and again.status == status
        assert again.submission_id == plan.base_id
    jobs.finish(plan.base_id, "FAILED")
    held = submit(plan, jobs, retry=False, register=no_mlflow)  # a scheduler's poll
    assert not held.created and held.status == "FAILED" and len(jobs.jobs) == 1
    second = submit(plan, jobs, register=no_mlflow)
    assert second.created and second.submission_id == f"{plan.base_id}-a2"
    assert (second.attempt, second.previous) == (2, "FAILED")
    assert jobs.jobs[second.submission_id]["metadata"]["deltamoe.attempt"] == "2"
    jobs.finish(second.submission_id, "STOPPED")
    third = submit(plan, jobs, register=no_mlflow)
    assert third.submission_id == f"{plan.base_id}-a3" and third.previous == "STOPPED"
    jobs.finish(third.submission_id, "SUCCEEDED")
    done = submit(plan, jobs, register=no_mlflow)
    assert not done.created and done.status == "SUCCEEDED"
    assert done.submission_id == f"{plan.base_id}-a3" and len(jobs.jobs) == 3


def test_metadata_links_the_mlflow_run_and_the_driver_gets_entrypoint_resources(
        tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from components.tracking import ExpansionTracker

    overrides = {"resources.driver.num_cpus": 0.5, "resources.driver.memory": 2 ** 30,
                 "resources.driver.resources": {"cpu_node": 0.01}}
    plan = plan_submission(cluster_config(tmp_path), overrides=overrides, working_dir=tmp_path,
                           env={})
    jobs = Jobs()
    sub = submit(plan, jobs)
    job = jobs.jobs[sub.submission_id]
    assert job["resources"] == {"entrypoint_num_cpus": 0.5, "entrypoint_num_gpus": 0.0,
                                "entrypoint_memory": 2 ** 30,
                                "entrypoint_resources": {"cpu_node": 0.01}}
    meta = job["metadata"]
    assert meta["job_name"] == "demo" and meta["deltamoe.code_version"] == plan.code_version
    uri = plan.tracking_uri
    client = MlflowClient(uri)
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "SCHEDULED" and run.info.run_name == "demo"
    assert run.data.tags["deltamoe.ray_submission_id"] == sub.submission_id
    assert meta["mlflow_run"].startswith(
        f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id} (mlflow ui")
    # the job's tracker reattaches to the run the metadata links to
    assert ExpansionTracker(uri, "deltamoe-demo", "demo").parent_run_id == run.info.run_id


def test_mlflow_links_carry_no_credentials() -> None:
    assert mlflow_run_link("https://bob:s3cret@mlflow.internal:5000/", "3", "abc") == \
        "https://mlflow.internal:5000/#/experiments/3/runs/abc"


def test_an_unreachable_tracking_server_refuses_the_submission(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nobody listens there
    plan = plan_submission(cluster_config(tmp_path), working_dir=tmp_path,
                           env={"MLFLOW_TRACKING_URI": f"http://u:pw@127.0.0.1:{port}"})
    jobs = Jobs()
    with pytest.raises(SubmitError, match="cannot reach the MLflow tracking store") as err:
        submit(plan, jobs)
    assert "pw" not in str(err.value) and jobs.jobs == {}


def test_submit_refuses_a_config_the_cluster_would_not_see(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = cluster_config(tmp_path)
    with pytest.raises(SubmitError, match="must be inside the working dir"):
        plan_submission(config, working_dir=work, env={})
    (work / "runs").mkdir()
    (work / "runs" / "x.yaml").write_text(config.read_text())
    with pytest.raises(SubmitError, match="excludes"):
        plan_submission(work / "runs" / "x.yaml", working_dir=work, env={})


def test_runtime_env_passes_the_named_variables_through(tmp_path: Path) -> None:
    env = {**ENV, "AWS_SECRET_ACCESS_KEY": "s3cr3t", "UNRELATED": "x", "MY_VAR": "y"}
    plan = plan_submission(cluster_config(tmp_path), working_dir=tmp_path, env=env,
                           extra_env=["MY_VAR"])
    rt = plan.runtime_env
    assert rt["working_dir"] == str(tmp_path) and "env_passthrough" not in rt
    assert rt["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert rt["env_vars"]["MY_VAR"] == "y" and "UNRELATED" not in rt["env_vars"]
    assert {".venv/", ".git/", "runs/", "checkpoints/", "data/",
            "benchmarks/.mergekit/"} <= set(rt["excludes"])
    assert "torch==2.13.0" in rt["pip"]["packages"]
    assert plan.shown_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_MASK
    assert plan.shown_env["env_vars"]["MLFLOW_TRACKING_URI"] == ENV["MLFLOW_TRACKING_URI"]
    assert "pip" not in plan_submission(cluster_config(tmp_path), working_dir=tmp_path,
                                        env=env, pip=False).runtime_env


def test_wait_for_jobs_polls_every_job_until_each_ended() -> None:
    from workflows.submit import wait_for_jobs

    jobs = Jobs()
    for sid in ("a", "b"):
        jobs.submit_job(entrypoint="x", submission_id=sid)
    script = {"a": iter(["RUNNING", "SUCCEEDED"]), "b": iter(["PENDING", "RUNNING", "FAILED"])}
    real = jobs.get_job_info

    def progressing(sid: str):
        if sid in script:
            jobs.finish(sid, next(script[sid], jobs.jobs[sid]["status"]))
        return real(sid)

    jobs.get_job_info = progressing  # type: ignore[method-assign]
    assert wait_for_jobs(jobs, ["a", "b"], poll=0.01) == {"a": "SUCCEEDED", "b": "FAILED"}
    with pytest.raises(SubmitError, match="no job c"):
        wait_for_jobs(jobs, ["c"], poll=0.01)
