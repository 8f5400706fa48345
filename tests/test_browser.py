"""The MLflow UI in a real browser: `mlflow server` on loopback, the variant run opened in
headless Chromium (Debian's package, installed by `make setup`), a screenshot taken, and the
per-language metrics read from the rendered page; the variants compared language by language
in one table (the compare view), and the DeltaMoE model's page listing its scores. The
generated HTML report is opened the same way. Skipped, with the reason, where Chromium is not
installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient
from report_fixtures import NEW, ORIGINAL, SCORES, log_run, make_config
from servers import free_ports, stop_group, wait_http

from components.evaluate.results import ResultRow
from components.tracking import RankZeroLogger
from dashboards.report import build_report
from workflows.evaluate_stage import log_variant, metric_key, registered_model_name

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (`make "
                                "setup` installs Debian's chromium package where apt-get runs)")
WINDOW = (1400, 1600)


def _chromium(*args: str, url: str, window: tuple[int, int] = WINDOW
              ) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", "--virtual-time-budget=20000",
           f"--window-size={window[0]},{window[1]}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory):
    """(MLflow UI base URL, experiment id, variant run id, report path, variant run ids, the
    DeltaMoE LoggedModel's id): a logged run served by an `mlflow server` this module starts
    and stops (its process group only). The variant runs also get what the evaluate stage logs
    (`log_variant`: the shared keys, the LoggedModel's metrics, the registered version)."""
    tmp = tmp_path_factory.mktemp("browser")
    _, cfg = make_config(tmp)
    tracker, run_dir = log_run(cfg)
    report = build_report(cfg, run_dir)
    for variant, by_lang in SCORES.items():
        logger = RankZeroLogger(tracker.tracking_uri, tracker.stage_run_id(f"eval_{variant}"),
                                rank=0)
        model_dir = tmp / "models" / variant
        model_dir.mkdir(parents=True)
        log_variant(logger, cfg, run_dir, variant, model_dir, "fp", _rows(by_lang), None)
    tracker.finish()
    client = MlflowClient(cfg.tracking.uri)
    run, = client.search_runs([tracker.experiment_id], filter_string="tags.variant = 'deltamoe'")
    variants = {name: client.search_runs([tracker.experiment_id],
                                         filter_string=f"tags.variant = '{name}'")[0].info.run_id
                for name in SCORES}
    model_id = client.get_model_version_by_alias(registered_model_name(cfg),
                                                 "candidate").tags["model_id"]
    port, = free_ports(1)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking.uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", server, tmp / "server.log", "mlflow server")
        yield base, tracker.experiment_id, run.info.run_id, report, variants, model_id
    finally:
        stop_group(server)
        log.close()


def _rows(by_lang: dict[str, tuple[float, float]]) -> list[ResultRow]:
    return [row for lang, (acc, ppl) in by_lang.items()
            for row in (ResultRow("synthetic_mc", lang, "acc", acc, 0.02, 32),
                        ResultRow("synthetic_ppl", lang, "word_perplexity", ppl, None, 32))]


def _text(html: str) -> list[str]:
    """The rendered page's text nodes, in document order."""
    return [t.strip() for t in re.split(r"<[^>]+>", html) if t.strip()]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_mlflow_ui_shows_the_per_language_metrics(tracked, tmp_path: Path) -> None:
    base, experiment_id, run_id, *_ = tracked
    url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    dom = _chromium("--dump-dom", url=url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "eval_deltamoe" in page  # the run's page, rendered by the UI's JavaScript
    for lang in (*ORIGINAL, *NEW):
        acc, ppl = SCORES["deltamoe"][lang]
        assert f"eval/synthetic_mc/{lang}/acc" in page, lang
        assert f"eval/synthetic_ppl/{lang}/word_perplexity" in page, lang
        assert f">{acc:g}<" in page and f">{ppl:g}<" in page, lang

    shot = tmp_path / "mlflow-run.png"
    taken = _chromium(f"--screenshot={shot}", url=url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert _png_size(shot) == WINDOW
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_report_renders_in_the_browser(tracked, tmp_path: Path) -> None:
    report = tracked[3]
    dom = _chromium("--dump-dom", url=report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<td class="best">0.634 ± 0.087 <span class="n">n=32</span></td>' in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") == 5
    shot = tmp_path / "report.png"
    assert _chromium(f"--screenshot={shot}", url=report.as_uri()).returncode == 0
    assert _png_size(shot) == WINDOW


def test_compare_view_sets_the_variants_side_by_side_per_language(tracked,
                                                                    tmp_path: Path) -> None:
    """One table: a row per language (and average) of each metric, a column per variant."""
    base, experiment_id, _, _, variants, _ = tracked
    ids = list(variants.values())
    url = (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
           f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
    dom = _chromium("--dump-dom", url=url, window=(1400, 4000))  # the grid renders what shows
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = _text(dom.stdout)
    metrics = text[text.index("Metrics"):text.index("Artifacts")]
    keys = [t for t in metrics if t.startswith("eval/")]
    values = [float(t) for t in metrics[len(keys) + 2:]]  # after "Metrics", "Show diff only"
    assert len(values) == len(keys) * len(ids)
    table = {key: values[i * len(ids):(i + 1) * len(ids)] for i, key in enumerate(keys)}
    # (the grid renders the rows that fit: the first metric's languages and the averages)
    for lang in (*ORIGINAL, *NEW):
        assert table[metric_key("synthetic_mc", "acc", lang)] == \
            [SCORES[v][lang][0] for v in variants]
    for index, (task, metric) in enumerate((("synthetic_mc", "acc"),
                                            ("synthetic_ppl", "word_perplexity"))):
        for group, langs in (("avg_original", ORIGINAL), ("avg_new", NEW)):
            expected = [sum(SCORES[v][lang][index] for lang in langs) / len(langs)
                        for v in variants]
            assert table[metric_key(task, metric, group)] == \
                pytest.approx(expected, rel=2e-3)  # the UI shows 4 significant digits
    shot = tmp_path / "mlflow-compare.png"
    assert _chromium(f"--screenshot={shot}", url=url).returncode == 0
    assert _png_size(shot) == WINDOW


def test_model_page_lists_its_evaluation_metrics(tracked) -> None:
    base, experiment_id, *_, model_id = tracked
    dom = _chromium("--dump-dom", url=f"{base}/#/experiments/{experiment_id}/models/{model_id}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = _text(dom.stdout)
    assert "deltamoe" in text
    assert "Metrics (12)" in text  # 2 metrics × (4 languages + 2 averages)
    for lang in (*ORIGINAL, *NEW):
        key = metric_key("synthetic_mc", "acc", lang)
        assert text[text.index(key) + 3] == f"{SCORES['deltamoe'][lang][0]:g}", lang
    assert "lineage.target" in text and "lineage.method" in text
    assert "reported-deltamoe" in text  # its registered version
