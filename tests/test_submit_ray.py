"""`deltamoe submit` against a real Ray head on loopback: a job whose storage root comes from
the cluster's own environment, its MLflow run created by the submitter and reattached by the
job, a no-op resubmission, a failed job retried as a new attempt, and stock `ray job submit`
as the README documents it.

The head gets its own temp dir and free ports, runs in its own process group, and is ended by
killing that group (never `ray stop`, which would end every Ray instance on the machine). Its
environment holds RSUB_CLUSTER_RUNS, as a KubeRay pod's would hold a secretKeyRef.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from servers import free_ports, stop_group, wait_http

from workflows.cli import DEMO_CONFIG

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@pytest.fixture(scope="module")
def ray_head():
    """(job server address, metrics URL, the cluster's runs dir) of a Ray head this module
    owns; the runs dir reaches jobs only through the head's own environment."""
    ports = free_ports(9 + 41)  # nine components, then the 41 worker ports
    gcs, dash, metrics, client, nm, om, rea, dag, dagg, wmin = ports[:10]
    temp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--runtime-env-agent-port={rea}",
           f"--dashboard-agent-listen-port={dag}", f"--dashboard-agent-grpc-port={dagg}",
           f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 40}",
           "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(Path(temp) / "head.log", "w")
    cluster_runs = Path(temp) / "cluster-runs"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=_env(RSUB_CLUSTER_RUNS=str(cluster_runs)),
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{address}/api/version", proc, Path(temp) / "head.log", "ray head")
        yield address, f"http://127.0.0.1:{metrics}/metrics", cluster_runs
    finally:
        # `ray start --block` outlives SIGTERM (the fixture's teardown used to wait the whole
        # 30 s grace); the head's state is thrown away with its temp dir, so 5 s is enough
        stop_group(proc, grace=5.0)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _deltamoe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, env=env, timeout=400)


def _work(tmp_path: Path, root: str) -> Path:
    """A working dir: a snapshot of the code (what the job imports, and what its code version
    hashes) and a tiny world-only config whose storage root is ``root``."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["run_name"] = "submitted"
    cfg["world"].update(num_people=16, docs_per_language=24, vocab_size=600, base_steps=0)
    cfg["storage"]["root"] = root
    work = tmp_path / "work"
    for package in ("components", "workflows"):
        shutil.copytree(ROOT / package, work / package,
                        ignore=shutil.ignore_patterns("__pycache__", "configs"))
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work


def test_submit_wait_then_resubmit_is_a_no_op(ray_head, tmp_path: Path) -> None:
    address, _, cluster_runs = ray_head
    work = _work(tmp_path, "${RSUB_CLUSTER_RUNS}")
    db = tmp_path / "mlflow.db"
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_TRACKING_PASSWORD="hunter2-secret",
               RSUB_CLUSTER_RUNS="/nonexistent/the-submitters-copy")
    args = ("submit", str(work / "tiny.yaml"), "--address", address, "--only", "world",
            "--working-dir", str(work), "--no-pip", "--cluster-env", "RSUB_CLUSTER_RUNS")

    first = _deltamoe(*args, "--wait", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sid = re.search(r"submitted (deltamoe-submitted-[0-9a-f]{12}) \(attempt 1\): python -m "
                    r"workflows.cli run tiny.yaml --only world", first.stdout).group(1)
    assert f"job {sid}: SUCCEEDED" in first.stdout
    assert "world" in first.stdout and "MLflow run" in first.stdout  # the job's own summary
    assert "hunter2" not in first.stdout + first.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in first.stdout  # named as passed, value never shown

    # the job wrote where the cluster's environment says, into the submitter's MLflow store
    assert (cluster_runs / "submitted" / "world" / "manifest.json").is_file()
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deltamoe-demo")
    runs = client.search_runs([experiment.experiment_id])
    parent, = (r for r in runs if r.data.tags.get("deltamoe.kind") == "expansion")
    assert parent.info.run_name == "submitted" and parent.info.status == "FINISHED"
    assert parent.data.tags["deltamoe.ray_submission_id"] == sid
    child, = (r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id)
    assert child.data.tags["deltamoe.stage"] == "world"
    assert child.data.metrics["world/documents/swh_Latn"] == 24 + 1 + 1

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(address)
    info = jobs.get_job_info(sid)
    assert info.metadata["job_name"] == "submitted"
    assert info.metadata["mlflow_run_id"] == parent.info.run_id  # the link names the run used
    assert f"#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}" in \
        info.metadata["mlflow_run"]
    sent = info.runtime_env["env_vars"]
    assert "RSUB_CLUSTER_RUNS" not in sent  # left to the cluster: the submitter's never sent
    assert sent["MLFLOW_TRACKING_URI"] == f"sqlite:///{db}"

    again = _deltamoe(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert f"already submitted {sid} (SUCCEEDED): nothing new started" in again.stdout
    assert [j.submission_id for j in jobs.list_jobs()].count(sid) == 1
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)

    status = _deltamoe("status", sid, "--address", address, env=env)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout
    logs = _deltamoe("logs", sid, "--address", address, env=env)
    assert logs.returncode == 0 and "MLflow run" in logs.stdout
    stop = _deltamoe("stop", sid, "--address", address, env=env)
    assert stop.returncode == 0 and "already ended" in stop.stdout
    missing = _deltamoe("status", "deltamoe-nope-000000000000", "--address", address, env=env)
    assert missing.returncode == 2 and "no job deltamoe-nope-000000000000" in missing.stderr


def test_a_failed_job_is_retried_as_a_new_attempt(ray_head, tmp_path: Path) -> None:
    """The cluster does not set the variable the config leaves to it: the job FAILS there (its
    own one-line config error); submitting again starts attempt 2 instead of a no-op."""
    address, _, _ = ray_head
    work = _work(tmp_path, "${RSUB_NOT_ON_CLUSTER}")
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ("submit", str(work / "tiny.yaml"), "--address", address, "--only", "world",
            "--working-dir", str(work), "--no-pip", "--cluster-env", "RSUB_NOT_ON_CLUSTER")
    first = _deltamoe(*args, "--wait", env=env)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    sid = re.search(r"submitted (deltamoe-submitted-[0-9a-f]{12}) \(attempt 1\)",
                    first.stdout).group(1)
    assert f"job {sid}: FAILED" in first.stdout
    assert "environment variable RSUB_NOT_ON_CLUSTER is not set" in first.stdout

    second = _deltamoe(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert f"submitted {sid}-a2 (attempt 2; attempt 1 FAILED)" in second.stdout
    follow = _deltamoe("logs", f"{sid}-a2", "--address", address, "--follow", env=env)
    assert follow.returncode == 1 and f"job {sid}-a2: FAILED" in follow.stdout


def test_the_driver_asks_for_its_entrypoint_resources(ray_head, tmp_path: Path) -> None:
    """resources.driver reaches Ray as entrypoint resources: a driver asking for a resource no
    node has is not started (a job without it would have run within seconds)."""
    address, _, _ = ray_head
    work = _work(tmp_path, "${RSUB_CLUSTER_RUNS}")
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = _deltamoe("submit", str(work / "tiny.yaml"), "--address", address, "--only", "world",
                     "--working-dir", str(work), "--no-pip", "--cluster-env",
                     "RSUB_CLUSTER_RUNS", "--set", "resources.driver.resources={rsub_absent: 1}",
                     env=env)
    assert proc.returncode == 0, proc.stderr
    sid = re.search(r"submitted (\S+) \(attempt 1\)", proc.stdout).group(1)
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(address)
    time.sleep(10)
    info = jobs.get_job_info(sid)
    assert str(info.status) in ("PENDING", "JobStatus.PENDING"), (info.status, info.message)
    assert info.driver_node_id in (None, "")
    stop = _deltamoe("stop", sid, "--address", address, env=env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout


def test_stock_ray_job_submit_as_the_readme_documents(ray_head, tmp_path: Path) -> None:
    """`ray job submit --runtime-env cluster/runtime_env.yaml -- python -m workflows.cli ...`
    (the runtime env without its pip section, as on an image that holds the dependencies): the
    shipped code runs with no `deltamoe` script, and ${VAR} resolves from the cluster's env."""
    address, _, cluster_runs = ray_head
    work = _work(tmp_path, "${RSUB_CLUSTER_RUNS}")
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env.pop("pip")
    runtime_env["working_dir"] = str(work)
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env",
         str(tmp_path / "runtime_env.yaml"), "--entrypoint-num-cpus", "1", "--submission-id",
         "stock-validate", "--", "python", "-m", "workflows.cli", "config", "show",
         "tiny.yaml"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job 'stock-validate' succeeded" in proc.stdout
    assert f"root: {cluster_runs}" in proc.stdout  # resolved on the cluster


def test_ray_exports_the_node_metrics_the_dashboard_plots(ray_head) -> None:
    """The Grafana dashboard's CPU node panels query metrics this Ray head really exports
    (GPU gauges appear only on GPU nodes; test_cluster_manifests checks their names)."""
    from test_cluster_manifests import dashboard_metrics

    _, url, _ = ray_head
    wanted = {m for m in dashboard_metrics()
              if m.startswith("ray_node_") and not m.startswith(("ray_node_gpus", "ray_node_gram"))}
    assert len(wanted) >= 5
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            exported = set(re.findall(r"^(ray_[A-Za-z0-9_]+)", r.read().decode(), flags=re.M))
        if wanted <= exported or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= exported, sorted(wanted - exported)
