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


LANGS = {"original": ["eng_Latn", "deu_Latn"], "new": ["swh_Latn"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the tests below (creating one costs seconds); each test tracks its
    own expansion in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _variant_rows(shift: float) -> list:
    from components.evaluate.results import ResultRow

    return [ResultRow("synthetic_mc", lang, "acc", round(0.5 + shift + 0.1 * i, 3), 0.02, 32)
            for i, lang in enumerate([*LANGS["original"], *LANGS["new"]])]


def test_variant_runs_share_keys_and_their_models_carry_the_scores(
        store: str, run_dir: RunDir, tmp_path: Path) -> None:
    """Every variant's run has the same keys (charted across runs), its LoggedModel the same
    metrics and its lineage; the final model is registered with the `candidate` alias."""
    import json

    from workflows.evaluate_stage import log_variant, metric_key, registered_model_name

    cfg = parse_config({"run_name": "scored", "languages": LANGS,
                        "models": {"base": str(tmp_path / "base"), "post": "org/post"}})
    tracker = ExpansionTracker(store, "deltamoe-test", "scored")
    stage = StageDir(str(tmp_path / "models" / "deltamoe"))
    with stage.build("fp") as work:
        (work.path / "config.json").write_text("{}")
    built = RankZeroLogger(tracker.tracking_uri, tracker.stage_run_id("deltamoe"), rank=0)
    graft_model = built.log_external_model("deltamoe", stage.uri, stage.read_manifest())
    for shift, variant in ((0.0, "post"), (0.2, "deltamoe")):
        with tracker.stage(f"eval_{variant}") as logger:
            log_variant(logger, cfg, run_dir, variant, tmp_path / "models" / variant, "fp",
                        _variant_rows(shift), None)
    client = MlflowClient(tracker.tracking_uri)
    runs = {r.data.tags["variant"]: r for r in client.search_runs(
        [tracker.experiment_id], "tags.variant != '' and tags.`deltamoe.run_name` = 'scored'")}
    assert sorted(runs) == ["deltamoe", "post"]
    assert set(runs["post"].data.metrics) == set(runs["deltamoe"].data.metrics) == {
        metric_key("synthetic_mc", "acc", k) for k in
        ("eng_Latn", "deu_Latn", "swh_Latn", "avg_original", "avg_new")}
    moe = runs["deltamoe"].data.metrics
    assert moe[metric_key("synthetic_mc", "acc", "avg_original")] == pytest.approx(0.75)
    assert moe[metric_key("synthetic_mc", "acc", "avg_new")] == pytest.approx(0.9)
    assert runs["post"].data.metrics[metric_key("synthetic_mc", "acc", "swh_Latn")] == 0.7

    # the graft stage's LoggedModel is the one scored, with its lineage as params
    model = client.get_logged_model(graft_model)
    assert {m.key: m.value for m in model.metrics} == moe
    assert model.params["lineage.base"] == str(tmp_path / "base")
    assert model.params["lineage.post"] == "org/post"
    assert model.params["lineage.target"] == f"{run_dir.uri}/models/cpt_moe"
    # a variant no stage recorded (a hub model) gets an external reference of its own
    post, = client.search_logged_models([tracker.experiment_id], filter_string="name = 'post'")
    assert post.tags[MLFLOW_MODEL_IS_EXTERNAL] == "true"
    assert {m.key for m in post.metrics} == set(moe)

    name = registered_model_name(cfg)
    assert name == "scored-deltamoe"
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.source == (tmp_path / "models" / "deltamoe").resolve().as_uri()
    assert version.tags["model_id"] == graft_model
    assert version.run_id == runs["deltamoe"].info.run_id
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]
    assert [v.name for v in client.search_registered_models()] == [name]  # post: not registered


def test_stage_runs_open_where_the_work_starts(store: str) -> None:
    """A worker opens its own stage run (start = when it opens it) tagged with the code
    version; a rerun reattaches to the same run."""
    import time

    tracker = ExpansionTracker(store, "deltamoe-test", "timed")

    runs = pickle.loads(pickle.dumps(tracker.stage_runs()))
    before = int(time.time() * 1000)
    run_id = runs.open("eval_post")
    assert runs.open("eval_post") == run_id == tracker.stage_run_id("eval_post")
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.start_time >= before
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == tracker.parent_run_id
    parent = client.get_run(tracker.parent_run_id)
    for tags in (run.data.tags, parent.data.tags):
        assert tags["deltamoe.version"]
        assert len(tags["mlflow.source.git.commit"].removesuffix("-dirty")) == 40


def test_resolved_config_yaml_and_parent_summary(store: str, tmp_path: Path) -> None:
    import yaml

    tracker = ExpansionTracker(store, "deltamoe-test", "summarised")

    cfg = parse_config({
        "run_name": "exp1", "languages": LANGS,
        "models": {"base": "b", "post": "p", "hf_token": "hf_SUPERSECRET"},
        "tracking": {"tags": {"owner": "team", "api_key": "KEY123"}},
    }, env={})
    tracker.log_config(cfg.model_dump(mode="json"), "fp")
    client = MlflowClient(tracker.tracking_uri)
    path = client.download_artifacts(tracker.parent_run_id, "config/resolved.yaml",
                                     str(tmp_path))
    text = Path(path).read_text()
    assert "SUPERSECRET" not in text and "KEY123" not in text
    resolved = yaml.safe_load(text)
    assert resolved["models"]["hf_token"] == REDACTED
    assert resolved["tracking"]["tags"] == {"owner": "team", "api_key": REDACTED}
    assert resolved["languages"]["new"] == ["swh_Latn"]
    assert resolved["upcycle"]["num_experts"] == 4  # defaults filled in

    from workflows.evaluate_stage import _headline

    comparison = [{"variant": "post", "task": "t", "metric": "acc", "original": 0.8, "new": 0.2},
                  {"variant": "deltamoe", "task": "t", "metric": "acc", "original": 0.75,
                   "new": 0.6}]
    metrics, description = _headline(cfg, comparison, "| table |")
    with tracker.stage("evaluate") as logger:
        logger.log_parent_summary(metrics, description)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.metrics == pytest.approx({
        "summary/t/acc/avg_original": 0.75, "summary/t/acc/avg_new": 0.6,
        "summary/t/acc/avg_original_vs_post": -0.05, "summary/t/acc/avg_new_vs_post": 0.4})
    note = parent.data.tags["mlflow.note.content"]
    assert "`b` + `p`" in note and "swh_Latn" in note and note.endswith("| table |\n")


def test_training_data_is_a_dataset_input(store: str, tmp_path: Path) -> None:
    import json

    tracker = ExpansionTracker(store, "deltamoe-test", "trained")

    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.tracking import parquet_dataset

    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    for i, langs in enumerate((["swh_Latn"] * 3 + ["eng_Latn"], ["swh_Latn", "rus_Cyrl"])):
        pq.write_table(pa.table({"input_ids": [[1] * 16 for _ in langs], "lang": langs,
                                 "source": ["s"] * len(langs)}), folder / f"{i}.parquet")
    paths = sorted(str(p) for p in folder.glob("*.parquet"))
    run_id = tracker.stage_run_id("cpt_moe")
    RankZeroLogger(tracker.tracking_uri, run_id, rank=0).log_dataset(**parquet_dataset(paths))
    inputs = MlflowClient(tracker.tracking_uri).get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "training-data" and dataset.source == str(folder)
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    profile = json.loads(dataset.profile)
    assert profile["rows_per_language"] == {"swh_Latn": 4, "eng_Latn": 1, "rus_Cyrl": 1}
    assert profile["tokens_per_language"]["swh_Latn"] == 64 and profile["seq_len"] == 16
    assert json.loads(dataset.schema)["columns"]["lang"] == "string"
    assert parquet_dataset(paths[:1])["digest"][:36] != dataset.digest  # other files
