"""`deltamoe report`: the HTML report of a run, from MLflow metrics and stage manifests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from report_fixtures import NEW, ORIGINAL, log_run, make_config

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
    assert acc["post"] == ["0.812", "0.774", "0.281", "0.266", "0.793", "0.2735"]
    assert acc["deltamoe"] == ["0.803", "0.769", "0.634", "0.597", "0.786", "0.6155"]
    assert _cells(html, "synthetic_ppl", "word_perplexity")["deltamoe"][2:4] == ["21", "24.25"]
    # best per language: higher accuracy, lower perplexity
    assert '<td class="best">0.634</td>' in html and '<td class="best">0.812</td>' in html
    assert '<td class="best">21</td>' in html and '<td class="best">95</td>' not in html
    assert "(lower is better)" in html
    # 2 metrics × (per-language + averages) plots, 1 router heatmap, all embedded
    assert html.count('src="data:image/png;base64,') == 5
    assert "router load: deltamoe" in html and "No router load" not in html
    lineage = html[html.index('id="lineage"'):]
    assert "<td>world</td>" in lineage and "<td>models/post</td>" in lineage
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
    assert _cells(path.read_text(), "flores", "bleu")["post"][0] == "3.5"


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
