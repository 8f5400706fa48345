"""`deltamoe report`: the HTML report of a run, from MLflow metrics and stage manifests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from report_fixtures import NEW, ORIGINAL, acc_stderr, log_run, make_config

from components.tracking import RankZeroLogger
from dashboards.report import build_report, collect


def _cells(html: str, task: str, metric: str) -> dict[str, list[str]]:
    """variant → the text of its row's cells in the table of (task, metric)."""
    table = re.search(rf'<table class="results" data-task="{task}" data-metric="{metric}">'
                      r"(.*?)</table>", html, re.S).group(1)
    rows = {}
    for row in re.findall(r"<tr><td>(.*?)</tr>", table, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", "<td>" + row)
        rows[cells[0]] = cells[1:]
    return rows


def test_report_tables_figures_lineage_and_artifact(tmp_path: Path) -> None:
    _, cfg = make_config(tmp_path)
    tracker, run_dir = log_run(cfg)
    with tracker.stage("report") as logger:
        path = build_report(cfg, run_dir, logger=logger)
    assert path == Path(run_dir.uri) / "report" / "index.html"
    html = path.read_text()

    acc = _cells(html, "synthetic_mc", "acc")
    # columns: original languages then new ones, then the two averages
    header = re.search(r'data-metric="acc">\s*<tr><th>variant</th>(.*?)</tr>', html, re.S)
    assert re.findall(r"<th[^>]*>(.*?)</th>", header.group(1)) == [
        *ORIGINAL, *NEW, "original avg", "expanded avg"]
    n = '<span class="n">n=32</span>'
    # every cell: value ± stderr over n (stderr as lm-eval computes it for 0/1 scores)
    assert acc["post"][:4] == [f"0.812 ± 0.07 {n}", f"0.774 ± 0.075 {n}", f"0.281 ± 0.081 {n}",
                               f"0.266 ± 0.079 {n}"]
    assert acc["deltamoe"][2] == f"0.634 ± 0.087 {n}"
    # group means: the stderr of a mean of independent languages, √Σse² / k, over 2 × 32 items
    se = (acc_stderr(0.634) ** 2 + acc_stderr(0.597) ** 2) ** 0.5 / 2
    assert acc["deltamoe"][5] == f'0.6155 ± {se:.2g} <span class="n">n=64</span>'
    assert _cells(html, "synthetic_ppl", "word_perplexity")["deltamoe"][2:4] == [
        f"21 {n}", f"24.25 {n}"]  # no stderr for perplexity: none shown, none invented
    # marked only beyond noise: the new languages' +0.35 is, the original ones' −0.009 is not,
    # and without stderr (perplexity) nothing is marked however far apart
    marked = re.findall(r'<td class="best">(.*?)</td>', html)
    assert marked == [f"0.634 ± 0.087 {n}", f"0.597 ± 0.088 {n}",
                      '0.6155 ± 0.062 <span class="n">n=64</span>']
    assert "(lower is better)" in html

    # the summary: what was expanded, the headline difference with its 95 % interval
    summary = html[html.index('id="summary"'):html.index('id="config"')]
    assert "from <b>eng_Latn, deu_Latn</b>" in summary and "<b>swh_Latn, rus_Cyrl</b>" in summary
    diff = 0.6155 - 0.2735
    half = 1.96 * ((acc_stderr(0.634) ** 2 + acc_stderr(0.597) ** 2) / 4
                   + (acc_stderr(0.281) ** 2 + acc_stderr(0.266) ** 2) / 4) ** 0.5
    assert f"<b>{diff:+.3g}</b> (95 % interval {diff - half:+.3g} to\n  {diff + half:+.3g}" \
        in summary and "better, beyond noise" in summary
    assert "difference -0.007" in summary and "within noise" in summary  # originals kept
    # the configuration and the legend of the variants, from the registry's help texts
    config = html[html.index('id="config"'):html.index('id="legend"')]
    assert "synthetic world (llama): models/base + models/post" in config
    assert "60 steps, sequences of 128" in config and "swh_Latn: 1, 2" in config
    assert "original (eng_Latn, deu_Latn): 0" in config
    assert "DeltaMoE: CPT-MoE + Expand(Δpost), the method itself" in html
    assert "its post-trained (instruct) sibling, as given" in html
    # the real status: the parent run is still open while the workflow builds its report
    assert '<span class="status FINISHED">FINISHED</span>' in html
    assert "(MLflow\n  status RUNNING)" in html and "all 5 stages finished" in html

    # 2 metrics × (per-language + averages) plots, 1 router heatmap, all embedded
    assert html.count('src="data:image/png;base64,') == 5
    assert "router load: deltamoe (outlined: the experts allocated to the language)" in html
    assert "No router load" not in html
    lineage = html[html.index('id="lineage"'):]
    assert "<td>world</td>" in lineage and "<td>models/post</td>" in lineage
    assert "<td>eval</td>" in lineage
    assert "No evaluation results yet" not in html and "http" not in html.replace(
        "http://www.w3.org", "")  # self-contained: nothing fetched from elsewhere

    client = MlflowClient(cfg.tracking.uri)
    logged = [a.path for a in client.list_artifacts(logger.run_id, "report")]
    assert logged == ["report/index.html"]

    # nothing new in MLflow: the report folder is kept as it is
    manifest = (path.parent / "manifest.json").read_text()
    assert build_report(cfg, run_dir) == path and (path.parent / "manifest.json").read_text() \
        == manifest
    # a new result: rebuilt
    extra = RankZeroLogger(cfg.tracking.uri, tracker.stage_run_id("eval_post"), rank=0)
    extra.log_metrics({"eval/flores/swh_Latn/bleu": 3.5}, step=0)
    build_report(cfg, run_dir)
    assert (path.parent / "manifest.json").read_text() != manifest
    assert _cells(path.read_text(), "flores", "bleu")["post"][0] == "3.5"  # MLflow: no stderr


def test_report_of_a_run_without_results_says_so(tmp_path: Path) -> None:
    _, cfg = make_config(tmp_path, "early")
    _, run_dir = log_run(cfg, with_results=False)
    data = collect(cfg.tracking.uri, "early", run_dir)
    assert data.results == {} and data.original == ORIGINAL and data.new == NEW
    assert [s["name"] for s in data.stages] == ["world", "models/post"]
    html = build_report(cfg, run_dir).read_text()
    assert "No evaluation results yet" in html and "No router load" in html
    assert "data:image/png" not in html


def test_cli_report(tmp_path: Path) -> None:
    config, cfg = make_config(tmp_path)
    tracker, _ = log_run(cfg)
    tracker.finish()
    env = {**os.environ}
    cmd = [sys.executable, "-m", "workflows.cli", "report"]
    proc = subprocess.run([*cmd, "reported", "--config", str(config)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = Path(cfg.storage.root) / "reported" / "report" / "index.html"
    assert f"report: {out}" in proc.stdout
    assert "0.634" in out.read_text()
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"  # reporting does not reopen the run
    child, = client.search_runs([parent.info.experiment_id],
                                filter_string="tags.`deltamoe.stage` = 'report'")
    assert [a.path for a in client.list_artifacts(child.info.run_id, "report")] == [
        "report/index.html"]

    # without --config: the run folder under --root and its own MLflow store
    env["MLFLOW_TRACKING_URI"] = cfg.tracking.uri
    again = subprocess.run([*cmd, "reported", "--root", cfg.storage.root], capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    missing = subprocess.run([*cmd, "nope", "--config", str(config)], capture_output=True,
                             text=True, env=env, timeout=300)
    assert missing.returncode == 2
    assert "no expansion run 'nope'" in missing.stderr and "Traceback" not in missing.stderr


def test_marks_intervals_status_and_metric_keys() -> None:
    """The rules behind the report's marks, without MLflow."""
    from dashboards.figures import allocated_experts, spans_decades
    from dashboards.report import metric_key
    from dashboards.summary import marked_best, run_status

    # ties at 0 (every variant failed every item) mark nothing; nor do overlapping intervals
    assert marked_best({"post": (0.0, 0.0), "deltamoe": (0.0, 0.0)}, "exact_match") is None
    assert marked_best({"post": (0.30, 0.08), "deltamoe": (0.40, 0.08)}, "acc") is None
    assert marked_best({"post": (0.30, 0.02), "deltamoe": (0.40, 0.02)}, "acc") == "deltamoe"
    assert marked_best({"post": (95.0, 2.0), "deltamoe": (21.0, 1.0)},
                       "word_perplexity") == "deltamoe"  # lower is better
    assert marked_best({"post": (95.0, None), "deltamoe": (21.0, None)}, "acc") is None
    # log axes only where the values span a decade
    assert spans_decades([11.5, 120.5]) and not spans_decades([0.2, 0.8, None])
    assert allocated_experts({"original": [0], "swh_Latn": [1, 2]},
                             {"original": ["eng_Latn"]}, "eng_Latn") == {0}
    # the status the stages tell, not the parent run that is open while the report is built
    done = [{"name": "data", "status": "FINISHED"}, {"name": "evaluate", "status": "FINISHED"}]
    assert run_status("RUNNING", done)["status"] == "FINISHED"
    assert run_status("RUNNING", done[:1])["status"] == "RUNNING"
    assert run_status("RUNNING", [*done, {"name": "cpt_moe", "status": "FAILED"}]) == {
        "status": "FAILED", "detail": "failed: cpt_moe"}
    # one parser for MLflow's eval keys, whatever order the segments after the task take
    assert metric_key("eval/belebele/swh_Latn/acc") == ("belebele", "swh_Latn", "acc")
    assert metric_key("eval/belebele/acc/swh_Latn") == ("belebele", "swh_Latn", "acc")
    assert metric_key("eval/synthetic_openbook/avg_new/exact_match/deltamoe") is None
    assert metric_key("eval/belebele/swh_Latn/acc_stderr") is None
