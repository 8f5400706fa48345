"""`deltamoe submit --wait` against a real Ray head on loopback; the second submit is a no-op.

The head gets its own temp dir and free ports, runs in its own process group, and is ended by
killing that group (never `ray stop`, which would end every Ray instance on the machine).
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


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@pytest.fixture(scope="module")
def ray_head():
    """(job server address, metrics URL) of a Ray head this module owns."""
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
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{address}/api/version", proc, Path(temp) / "head.log", "ray head")
        yield address, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _deltamoe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, env=env, timeout=400)


def test_submit_wait_then_resubmit_is_a_no_op(ray_head, tmp_path: Path) -> None:
    address, _ = ray_head
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["run_name"] = "submitted"
    cfg["world"].update(num_people=16, docs_per_language=24, vocab_size=600, base_steps=0)
    cfg["storage"]["root"] = str(tmp_path / "runs")
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_TRACKING_PASSWORD="hunter2-secret")
    args = ("submit", str(work / "tiny.yaml"), "--address", address, "--only", "world",
            "--working-dir", str(work), "--no-pip")

    first = _deltamoe(*args, "--wait", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sid = re.search(r"submitted (deltamoe-submitted-[0-9a-f]{12}): deltamoe run tiny.yaml "
                    r"--only world", first.stdout).group(1)
    assert f"job {sid}: SUCCEEDED" in first.stdout
    assert "world" in first.stdout and "MLflow run" in first.stdout  # the job's own summary
    assert "hunter2" not in first.stdout + first.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in first.stdout  # named as passed, value never shown

    # the job wrote its results into the submitter's MLflow store
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deltamoe-demo")
    runs = client.search_runs([experiment.experiment_id])
    parent, = (r for r in runs if r.data.tags.get("deltamoe.kind") == "expansion")
    assert parent.info.run_name == "submitted" and parent.info.status == "FINISHED"
    child, = (r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id)
    assert child.data.tags["deltamoe.stage"] == "world"
    assert child.data.metrics["world/documents/swh_Latn"] == 24 + 1 + 1
    assert (tmp_path / "runs" / "submitted" / "world" / "manifest.json").is_file()

    again = _deltamoe(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert f"already submitted {sid} (SUCCEEDED): nothing new started" in again.stdout
    from ray.job_submission import JobSubmissionClient

    jobs = [j for j in JobSubmissionClient(address).list_jobs() if j.submission_id == sid]
    assert len(jobs) == 1
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)

    status = _deltamoe("status", sid, "--address", address, env=env)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout
    logs = _deltamoe("logs", sid, "--address", address, env=env)
    assert logs.returncode == 0 and "MLflow run" in logs.stdout
    stop = _deltamoe("stop", sid, "--address", address, env=env)
    assert stop.returncode == 0 and "already ended" in stop.stdout
    missing = _deltamoe("status", "deltamoe-nope-000000000000", "--address", address, env=env)
    assert missing.returncode == 2 and "no job deltamoe-nope-000000000000" in missing.stderr



def test_ray_exports_the_node_metrics_the_dashboard_plots(ray_head) -> None:
    """The Grafana dashboard's CPU node panels query metrics this Ray head really exports
    (GPU gauges appear only on GPU nodes; test_cluster_manifests checks their names)."""
    from test_cluster_manifests import dashboard_metrics

    _, url = ray_head
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
