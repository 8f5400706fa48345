"""Multi-language sweeps: one config → one validated RunConfig per language set."""

from __future__ import annotations

import json

import pytest
import yaml

from components.config import ConfigError, load_config
from workflows.cli import DEMO_CONFIG
from workflows.sweep import LANGUAGES_TAG, SWEEP_TAG, expand_sweep, set_name, sweep_runs


@pytest.fixture(scope="module")
def demo():
    return load_config(DEMO_CONFIG, env={})


def test_one_run_per_set_with_narrowed_tables(demo) -> None:
    runs = expand_sweep(demo, [["swh_Latn"], ["Russian"], ["sw", "rus_Cyrl"]])
    assert [r.run_name for r in runs] == ["demo-swh", "demo-rus", "demo-swh-rus"]
    assert [r.languages.new for r in runs] == [["swh_Latn"], ["rus_Cyrl"],
                                               ["swh_Latn", "rus_Cyrl"]]
    assert all(r.languages.original == ["eng_Latn", "deu_Latn"] for r in runs)
    assert runs[0].data.mix.ratios == {"swh_Latn": 0.5}
    assert runs[2].data.mix.ratios == {"swh_Latn": 0.5, "rus_Cyrl": 0.5}
    assert runs[0].upcycle.allocation.experts == {"original": [0], "swh_Latn": [1, 2]}
    assert runs[1].upcycle.allocation.experts == {"original": [0], "rus_Cyrl": [1, 3]}
    # every run reads the same corpora, and the rest of the config is untouched
    for r in runs:
        assert r.data.sources == demo.data.sources
        assert r.train == demo.train and r.world == demo.world
        assert r.tracking.tags == {SWEEP_TAG: "demo", LANGUAGES_TAG: ",".join(r.languages.new)}
    assert demo.run_name == "demo" and demo.languages.new == ["swh_Latn", "rus_Cyrl"]


def test_named_sets_and_groups_narrowed(demo) -> None:
    cfg = demo.model_copy(deep=True)
    cfg.upcycle.allocation.groups["bantu_slavic"] = ["swh_Latn", "rus_Cyrl"]
    cfg.upcycle.allocation.experts["bantu_slavic"] = [3]
    runs = expand_sweep(cfg, {"east-africa": ["swh_Latn"]})
    assert runs[0].run_name == "demo-east-africa"
    assert runs[0].upcycle.allocation.groups == {"original": ["eng_Latn", "deu_Latn"],
                                                 "bantu_slavic": ["swh_Latn"]}
    assert runs[0].upcycle.allocation.experts["bantu_slavic"] == [3]


def test_overrides_reproduce_the_run_through_set(demo) -> None:
    """What a submitter ships: the base file plus ``--set KEY=JSON`` (read back as YAML)."""
    (name, overrides), = sweep_runs(demo, [["rus_Cyrl"]])
    assert name == "demo-rus"
    parsed = {k: yaml.safe_load(json.dumps(v)) for k, v in overrides.items()}
    again = load_config(DEMO_CONFIG, env={}, overrides=parsed)
    assert again == expand_sweep(demo, [["rus_Cyrl"]])[0]


def test_set_names() -> None:
    assert set_name(["swh_Latn", "yor_Latn"]) == "swh-yor"
    assert set_name(["srp_Cyrl", "srp_Latn"]) == "srp-cyrl-srp-latn"


@pytest.mark.parametrize("sets, where, message", [
    ([], "language_sets", "at least one"),
    ([["eng_Latn"]], "language_sets.eng", "already in languages.original"),
    ([["xx_Nope"]], "language_sets.0", "xx_Nope"),
    ([[]], "language_sets.0", "non-empty list"),
    (["swh_Latn"], "language_sets.0", "non-empty list"),
    ([["swh_Latn"], ["swh"]], "language_sets.swh", "named more than once"),
])
def test_bad_sets_name_the_key(demo, sets, where, message) -> None:
    with pytest.raises(ConfigError) as err:
        expand_sweep(demo, sets)
    assert any(path == where and message in text for path, text in err.value.issues), \
        err.value.issues


def test_summary_compares_runs_and_reports_failures(demo) -> None:
    from components.evaluate.results import ResultRow
    from workflows.expand import WorkflowResult
    from workflows.sweep import SweepRun, sweep_summary

    swh, rus = expand_sweep(demo, [["swh_Latn"], ["rus_Cyrl"]])
    rows = [ResultRow("synthetic_mc", lang, "acc", value, None, 10) for lang, value in
            (("eng_Latn", 0.8), ("deu_Latn", 0.7), ("swh_Latn", 0.6), ("rus_Cyrl", 0.1))]
    result = WorkflowResult("runs/demo-swh", "sqlite:///x", "r1",
                            stages={"world": "built", "data": "skipped (manifest matches)"},
                            evaluated={"deltamoe": rows})
    text = sweep_summary([SweepRun(swh, result), SweepRun(rus, error="GraftError: bad\nmore")])
    assert text.splitlines()[2:] == [
        "| demo-swh | swh_Latn | 2 (1 built) | deltamoe | synthetic_mc | acc | 0.750 | 0.600 |",
        "| demo-rus | rus_Cyrl | failed: GraftError: bad | | | | | |"]


def test_cli_sweep_runs_one_expansion_per_set(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["world"].update(num_people=16, docs_per_language=24, vocab_size=600, base_steps=0)
    cfg["storage"]["root"] = str(tmp_path / "runs")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "workflows.cli", "sweep", str(tmp_path / "c.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, "-l", "swh_Latn", "-l", "rus_Cyrl", "--only", "world"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## sweep of demo: 2 runs" in proc.stdout
    assert "| demo-swh | swh_Latn | 1 (1 built) | – | not evaluated |" in proc.stdout
    assert "| demo-rus | rus_Cyrl | 1 (1 built) | – | not evaluated |" in proc.stdout
    for name in ("demo-swh", "demo-rus"):
        assert (tmp_path / "runs" / name / "world" / "manifest.json").is_file()
    client = MlflowClient(cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name("deltamoe-demo")
    parents = client.search_runs([exp.experiment_id],
                                 filter_string=f"tags.`{SWEEP_TAG}` = 'demo'")
    assert sorted((r.info.run_name, r.data.tags[LANGUAGES_TAG]) for r in parents) == [
        ("demo-rus", "rus_Cyrl"), ("demo-swh", "swh_Latn")]

    bad = subprocess.run([*cmd, "-l", "eng_Latn"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "already in languages.original" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_sweep_submit_one_job_per_set_then_the_summary_reads_mlflow(tmp_path, monkeypatch) -> None:
    """``sweep --submit`` (job server swapped for the double of job_fakes) submits each set as
    its own job; the jobs then log as the workflow does (the submitter's parent run reattached,
    the evaluate stage's table logged by the evaluate stage's own code) and ``sweep-summary``
    collects the finished run's table, the failed run's state and the run not in MLflow."""
    from click.testing import CliRunner
    from job_fakes import Jobs, cluster_config
    from mlflow import MlflowClient

    import workflows.cli.cluster as cluster_cli
    from components.evaluate.results import ResultRow, comparison_rows
    from components.tracking import ExpansionTracker
    from workflows.cli import cli
    from workflows.evaluate_stage import _log_stage

    config = cluster_config(tmp_path)
    jobs = Jobs()
    monkeypatch.setattr(cluster_cli, "_client", lambda address: jobs)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "1")  # restored after the test (the commands set defaults)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    base = ["sweep", str(config), "-l", "swh_Latn", "-l", "rus_Cyrl", "--only", "world",
            "--submit", "--working-dir", str(tmp_path)]
    dry = runner.invoke(cli, [*base, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: 2 jobs" in dry.output and dry.output.count("entrypoint: python -m") == 2
    assert jobs.jobs == {}

    sub = runner.invoke(cli, [*base, "--address", "http://head:8265"])
    assert sub.exit_code == 0, sub.output
    assert len(jobs.jobs) == 2
    by_run = {job["metadata"]["job_name"]: job for job in jobs.jobs.values()}
    assert sorted(by_run) == ["demo-rus", "demo-swh"]
    assert 'languages.new=["swh_Latn"]' in by_run["demo-swh"]["entrypoint"]
    assert by_run["demo-swh"]["entrypoint"].endswith("--only world")
    assert all(job["resources"]["entrypoint_num_cpus"] == 1.0 for job in jobs.jobs.values())
    assert f"collect: deltamoe sweep-summary {config} -l swh_Latn -l rus_Cyrl" in sub.output
    again = runner.invoke(cli, [*base, "--address", "http://head:8265"])
    assert again.output.count("already submitted") == 2 and len(jobs.jobs) == 2

    # what the two jobs do on the cluster
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    swh = ExpansionTracker(uri, "deltamoe-demo", "demo-swh")
    assert swh.parent_run_id == by_run["demo-swh"]["metadata"]["mlflow_run_id"]
    rows = [ResultRow("synthetic_mc", lang, "acc", value, None, 10) for lang, value in
            (("eng_Latn", 0.8), ("deu_Latn", 0.6), ("swh_Latn", 0.5))]
    folder = tmp_path / "eval"
    (folder / "plots").mkdir(parents=True)
    flat = [{"variant": "deltamoe", **r.to_dict()} for r in rows]
    with swh.stage("evaluate") as logger:
        _log_stage(logger, load_config(config), folder, {
            "flat": flat, "routing": [], "table": "t",
            "comparison": comparison_rows({"deltamoe": rows}, ["eng_Latn", "deu_Latn"],
                                          ["swh_Latn"])})
    swh.finish()
    ExpansionTracker(uri, "deltamoe-demo", "demo-rus").finish(failed=True)
    assert len(MlflowClient(uri).search_runs(
        [swh.experiment_id], filter_string="tags.`deltamoe.kind` = 'expansion'")) == 2

    summary = runner.invoke(cli, ["sweep-summary", str(config), "-l", "swh_Latn", "-l",
                                  "rus_Cyrl", "-l", "swh_Latn,rus_Cyrl"])
    assert summary.exit_code == 1, summary.output  # a run failed
    assert summary.output.splitlines()[:3] == [
        "## sweep of demo: 3 runs",
        "| run | new languages | status | variant | task | metric | original | expanded |",
        "|---|---|---|---|---|---|---|---|"]
    assert summary.output.splitlines()[3:] == [
        "| demo-swh | swh_Latn | finished | deltamoe | synthetic_mc | acc | 0.700 | 0.500 |",
        "| demo-rus | rus_Cyrl | failed | | | | | |",
        "| demo-swh-rus | – | not in MLflow | | | | | |"]
    every = runner.invoke(cli, ["sweep-summary", str(config)])
    assert [line.split(" | ")[0] for line in every.output.splitlines()[3:]] == [
        "| demo-rus", "| demo-swh"]
