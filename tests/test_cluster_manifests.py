"""cluster/ and dashboards/grafana agree with the project: they parse, their images carry the
project's version on Ray's image of the pinned Ray and Python, their commands are real deltamoe
commands on files that exist, and the Grafana queries name metrics Ray really exports."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from croniter import croniter

from components.config import load_config
from workflows.cli import cli
from workflows.schedule import due_jobs, load_schedule

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE_HOME = "/home/ray/deltamoe"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPS = PYPROJECT["project"]["dependencies"]
RAY = next(d for d in DEPS if d.startswith("ray[")).split("==")[1]
IMAGE = f"ghcr.io/deltamoe/deltamoe:{PYPROJECT['project']['version']}"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "raycronjob.yaml")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _walk(node, key):
    """Every value of ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def dashboard_metrics() -> set[str]:
    """Metric names queried by dashboards/grafana/training.json (panels and variables)."""
    dash = json.loads((ROOT / "dashboards" / "grafana" / "training.json").read_text())
    exprs = list(_walk(dash["panels"], "expr"))
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", expr))
        names |= set(re.findall(r"label_values\(([A-Za-z_:][A-Za-z0-9_:]*)", expr))
    return names


def test_manifests_parse_and_use_the_project_image_and_ray() -> None:
    kinds = {name: _load(name)["kind"] for name in MANIFESTS}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob",
                     "raycronjob.yaml": "RayCronJob"}
    for name in MANIFESTS:
        doc = _load(name)
        assert doc["apiVersion"] == "ray.io/v1"
        assert set(_walk(doc, "rayVersion")) == {RAY}, name
        images = set(_walk(doc, "image"))
        assert images == {IMAGE}, (name, images)
    ray_up = _load("cluster.yaml")
    assert ray_up["docker"]["image"] == IMAGE
    assert ray_up["head_node_type"] in ray_up["available_node_types"]
    assert any("--metrics-export-port=8080" in c for c in ray_up["head_start_ray_commands"])
    head = _load("raycluster.yaml")["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["metrics-export-port"] == "8080"
    cron = _load("raycronjob.yaml")["spec"]
    assert croniter.is_valid(cron["schedule"])


def test_dockerfile_builds_on_rays_image_of_the_pinned_versions() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=rayproject/ray:(\S+)-py(\d)(\d+)$", text, re.M)
    assert base, "Dockerfile must build on rayproject/ray:<ray>-py<python>"
    ray_version, major, minor = base.group(1), int(base.group(2)), int(base.group(3))
    assert ray_version == RAY
    assert f"WORKDIR {IMAGE_HOME}" in text
    floor = tuple(int(x) for x in PYPROJECT["project"]["requires-python"][2:].split("."))
    assert (major, minor) >= floor
    assert (major, minor) == sys.version_info[:2]  # the image runs what the tests run
    assert re.search(rf"-t {re.escape(IMAGE)} ", text)


def _entrypoints() -> list[tuple[str, list[str]]]:
    out = [("rayjob.yaml", _load("rayjob.yaml")["spec"]["entrypoint"]),
           ("raycronjob.yaml", _load("raycronjob.yaml")["spec"]["jobTemplate"]["entrypoint"])]
    return [(name, shlex.split(command)) for name, command in out]


def _in_repo(path: str) -> Path:
    assert path.startswith(f"{IMAGE_HOME}/"), path
    return ROOT / path.removeprefix(f"{IMAGE_HOME}/")


@pytest.mark.parametrize("name, argv", _entrypoints(), ids=lambda v: v if isinstance(v, str)
                         else None)
def test_entrypoints_are_deltamoe_commands_on_files_in_the_image(name: str,
                                                                 argv: list[str]) -> None:
    assert argv[0] == "deltamoe", name
    group = cli
    args = argv[1:]
    while isinstance(group, type(cli)) and args[0] in group.commands:  # subcommand chain
        group, args = group.commands[args[0]], args[1:]
    ctx = group.make_context(argv[0], list(args))  # the options exist and parse
    if argv[1] == "run":
        cfg = load_config(_in_repo(ctx.params["config"].as_posix()), env={})
        assert cfg.run_name
    else:
        assert argv[1:3] == ["schedule", "run-due"], name
        path = _in_repo(ctx.params["schedule"].as_posix())
        jobs = due_jobs(load_schedule(path), path.parent, datetime(2026, 3, 1, 3, tzinfo=UTC))
        assert {j.run_name for j in jobs} == {"demo", "demo-swahili", "demo-russian",
                                              "demo-both"}
        assert ctx.params["address"].startswith("http://deltamoe-head-svc")


def test_runtime_env_pins_are_the_projects() -> None:
    env = _load("runtime_env.yaml")
    packages = env["pip"]["packages"]
    assert sorted(packages) == sorted(d for d in DEPS if not d.startswith("ray["))
    assert env["working_dir"] == "."
    assert "MLFLOW_TRACKING_URI" in env["env_passthrough"]


def _ray_exported() -> set[str]:
    """Names Ray 2.x exports to Prometheus: the node gauges of its reporter agent, the Ray
    Train v2 controller and worker metrics and the project's training gauges, each with Ray's
    ``ray_`` prefix."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES
    from ray.train.v2._internal.metrics.controller import ControllerMetrics
    from ray.train.v2._internal.metrics.worker import WorkerMetrics

    from components.train.prometheus import METRICS

    train = {v for cls in (ControllerMetrics, WorkerMetrics) for k, v in vars(cls).items()
             if k.isupper() and isinstance(v, str) and not k.endswith("_TAG_KEY")}
    return {f"ray_{n}" for n in (*METRICS_GAUGES, *train, *METRICS)}


def test_grafana_dashboard_queries_metrics_ray_exports() -> None:
    dash = json.loads((ROOT / "dashboards" / "grafana" / "training.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["targets"] and p["gridPos"]["w"] > 0 for p in panels)
    names = dashboard_metrics()
    assert names <= _ray_exported(), sorted(names - _ray_exported())
    assert {"ray_train_controller_state", "ray_train_report_total_blocked_time_s",
            "ray_node_gpus_utilization", "ray_node_gram_used", "ray_deltamoe_train_loss",
            "ray_deltamoe_train_tokens_per_second"} <= names


def _pod_env(container: dict) -> dict[str, str]:
    """A container's environment, a secretKeyRef standing for a value the Secret holds."""
    out = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        out[item["name"]] = "http://mlflow:5000" if ref and "mlflow" in ref["name"] else \
            (f"<secret {ref['name']}>" if ref else item["value"])
    return out


def test_the_cron_jobs_submissions_pass_the_cluster_checks() -> None:
    """What the RayCronJob's `run-due` submits from its pod's environment keeps its results
    (shared storage root, a tracking server) and leaves HF_TOKEN to the RayCluster."""
    from workflows.submit import plan_submission

    cron = _load("raycronjob.yaml")["spec"]["jobTemplate"]
    head, = cron["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = _pod_env(head)
    argv = shlex.split(cron["entrypoint"])
    ctx = cli.commands["schedule"].commands["run-due"].make_context("run-due", argv[3:])
    cluster_env = ctx.params["cluster_env"]
    assert "HF_TOKEN" in cluster_env and "HF_TOKEN" not in env
    target = _load("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    assert set(cluster_env) <= set(_pod_env(target["containers"][0]))  # the cluster sets them
    path = _in_repo(ctx.params["schedule"].as_posix())
    jobs = due_jobs(load_schedule(path), path.parent, datetime(2026, 3, 1, 3, tzinfo=UTC),
                    env=env)
    for job in jobs:
        plan = plan_submission(job.config, slot=job.slot, overrides=job.overrides,
                               run_args=job.run_args, working_dir=ROOT, env=env, pip=False,
                               cluster_env=cluster_env)
        assert plan.storage_uri == f"/mnt/deltamoe/runs/{job.run_name}"
        assert plan.tracking_uri == "http://mlflow:5000"
        assert "HF_TOKEN" not in plan.runtime_env["env_vars"]


def test_the_rayjob_takes_secrets_from_the_cluster_and_places_its_driver() -> None:
    from components.config import DriverResources

    spec = _load("rayjob.yaml")["spec"]
    assert spec["entrypointNumCpus"] == DriverResources().num_cpus
    assert "HF_TOKEN" not in spec["runtimeEnvYAML"]  # never in the job table
    for group in [spec["rayClusterSpec"]["headGroupSpec"],
                  *spec["rayClusterSpec"]["workerGroupSpecs"]]:
        container, = group["template"]["spec"]["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                if "valueFrom" in e}
        assert {"HF_TOKEN", "MLFLOW_TRACKING_URI"} <= set(refs)
