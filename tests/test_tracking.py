"""MLflow layout: parent + nested stage runs, reattachment, redaction, rank-0 logging."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_PARENT_RUN_ID

from components.config import parse_config
from components.storage import RunDir, StageDir
from components.tracking import (
    REDACTED,
    ExpansionTracker,
    RankZeroLogger,
    flatten_params,
    resolve_tracking_uri,
)


@pytest.fixture()
def run_dir(tmp_path: Path) -> RunDir:
    return RunDir(str(tmp_path / "runs"), "exp1")


@pytest.fixture()
def tracker(run_dir: RunDir) -> ExpansionTracker:
    return ExpansionTracker(resolve_tracking_uri(None, run_dir), "deltamoe-test", "exp1")


def test_tracking_uri_resolution(run_dir: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(None, run_dir) == f"sqlite:///{run_dir.local_path}/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", run_dir) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri("http://127.0.0.1:5000", run_dir) == "http://tracking:5000"


def test_parent_and_stage_runs_found_through_client(tracker: ExpansionTracker) -> None:
    with tracker.stage("data") as logger:
        logger.log_metrics({"data/tokens": 1234}, step=0)
    with pytest.raises(RuntimeError), tracker.stage("train"):
        raise RuntimeError("crash")
    client = MlflowClient(tracker.tracking_uri)
    exp = client.get_experiment_by_name("deltamoe-test")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{tracker.parent_run_id}'")
    by_stage = {r.data.tags["deltamoe.stage"]: r for r in children}
    assert set(by_stage) == {"data", "train"}
    assert by_stage["data"].info.status == "FINISHED"
    assert by_stage["train"].info.status == "FAILED"
    assert by_stage["data"].data.metrics == {"data/tokens": 1234.0}
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.run_name == "exp1"
    assert parent.data.tags["deltamoe.kind"] == "expansion"


def test_rerun_reattaches_to_same_runs(tracker: ExpansionTracker) -> None:
    first_stage = tracker.stage_run_id("train")
    tracker.finish(failed=True)
    again = ExpansionTracker(tracker.tracking_uri, "deltamoe-test", "exp1")
    assert again.parent_run_id == tracker.parent_run_id
    assert again.stage_run_id("train") == first_stage
    assert again.client.get_run(again.parent_run_id).info.status == "RUNNING"
    other = ExpansionTracker(tracker.tracking_uri, "deltamoe-test", "exp2")
    assert other.parent_run_id != tracker.parent_run_id


def test_secrets_redacted_from_params(tracker: ExpansionTracker) -> None:
    cfg = parse_config({
        "run_name": "exp1",
        "models": {"base": "b", "post": "p", "hf_token": "hf_SUPERSECRET"},
        "languages": {"original": ["eng_Latn"], "new": ["swh_Latn"]},
        "storage": {"root": "s3://bucket/runs",
                    "storage_options": {"key": "AKIA", "secret": "s3SECRET",
                                        "client_kwargs": {"aws_access_key_id": "AKIA2"}}},
        "tracking": {"tags": {"owner": "team", "api_key": "KEY123"}},
    }, env={})
    tracker.log_config(cfg.model_dump(mode="json"), "fp")
    params = MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id).data.params
    assert params["models.hf_token"] == REDACTED
    assert params["storage.storage_options.secret"] == REDACTED
    assert params["storage.storage_options.client_kwargs.aws_access_key_id"] == REDACTED
    assert params["tracking.tags.api_key"] == REDACTED
    assert params["tracking.tags.owner"] == "team"
    assert params["upcycle.num_experts"] == "4"
    joined = " ".join(params.values())
    for secret in ("hf_SUPERSECRET", "s3SECRET", "KEY123", "AKIA2"):
        assert secret not in joined


def test_flatten_params_shapes() -> None:
    flat = flatten_params({"a": {"b": [1, 2], "c": None, "d": {}}, "password": "x",
                           "db_passwd": "", "note": "**********"})
    assert flat == {"a.b": "[1, 2]", "a.c": "null", "a.d": "{}", "password": REDACTED,
                    "db_passwd": "", "note": REDACTED}


def test_changed_config_keeps_first_params(tracker: ExpansionTracker) -> None:
    tracker.log_config({"train": {"steps": 10}}, "fp-a")
    tracker.log_config({"train": {"steps": 20}, "seed": 1}, "fp-b")
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id)
    assert run.data.params == {"train.steps": "10", "seed": "1"}
    assert run.data.tags["deltamoe.config_fingerprint"] == "fp-b"


def test_rank_zero_logger_pickles_and_filters_ranks(tracker: ExpansionTracker) -> None:
    run_id = tracker.stage_run_id("train")
    worker0 = pickle.loads(pickle.dumps(RankZeroLogger(tracker.tracking_uri, run_id, rank=0)))
    worker1 = RankZeroLogger(tracker.tracking_uri, run_id, rank=1)
    worker0.log_metrics({"train/loss": 2.5}, step=1)
    worker1.log_metrics({"train/loss": 99.0}, step=1)
    worker1.log_params({"only": "rank1"})
    # a "restarted" worker: a fresh process would unpickle the same strings
    restarted = pickle.loads(pickle.dumps(worker0))
    restarted.log_metrics({"train/loss": 2.0}, step=2)
    client = MlflowClient(tracker.tracking_uri)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [(1, 2.5), (2, 2.0)]
    assert "only" not in client.get_run(run_id).data.params


def test_rank_from_environment(tracker: ExpansionTracker, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "3")
    assert not RankZeroLogger(tracker.tracking_uri, "x").is_rank_zero
    monkeypatch.setenv("RANK", "0")
    assert RankZeroLogger(tracker.tracking_uri, "x").is_rank_zero


def test_external_model_reference(tracker: ExpansionTracker, tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path / "ckpt"))
    with stage.build("fp") as work:
        (work.path / "model.safetensors").write_bytes(b"\0" * 1024)
    manifest = stage.read_manifest()
    logger = RankZeroLogger(tracker.tracking_uri, tracker.stage_run_id("train"), rank=0)
    model_id = logger.log_external_model("cpt-moe", stage.uri, manifest)
    client = MlflowClient(tracker.tracking_uri)
    model = client.get_logged_model(model_id)
    assert model.tags[MLFLOW_MODEL_IS_EXTERNAL] == "true"
    assert model.tags["uri"] == stage.uri
    assert model.tags["total_bytes"] == "1024"
    local = client.download_artifacts(logger.run_id, "models/cpt-moe.json", str(tmp_path))
    import json

    ref = json.loads(Path(local).read_text())
    assert ref["files"][0]["sha256"] == manifest.outputs[0].sha256
    assert not client.list_artifacts(logger.run_id, "model")  # nothing uploaded


def test_logger_from_a_ray_task(tracker: ExpansionTracker) -> None:
    """Ray workers get the logger pickled; what rank 0 logs lands in the stage run."""
    ray = pytest.importorskip("ray")
    run_id = tracker.stage_run_id("graft")
    logger = RankZeroLogger(tracker.tracking_uri, run_id)

    @ray.remote(num_cpus=0.5)
    def work(lg: RankZeroLogger, layer: int) -> bool:
        lg.log_metrics({"graft/layer_done": layer}, step=layer)
        return lg.is_rank_zero

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get([work.remote(logger, i) for i in range(3)]) == [True] * 3
    finally:
        ray.shutdown()
    history = MlflowClient(tracker.tracking_uri).get_metric_history(run_id, "graft/layer_done")
    assert sorted(m.step for m in history) == [0, 1, 2]
