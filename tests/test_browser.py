"""The MLflow UI in a real browser: `mlflow server` on loopback, the variant run opened in
headless Chromium (Debian's package, installed by `make setup`), a screenshot taken, and the
per-language metrics read from the rendered page. The generated HTML report is opened the same
way. Skipped, with the reason, where Chromium is not installed."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from report_fixtures import NEW, ORIGINAL, SCORES, log_run, make_config
from servers import free_ports, stop_group, wait_http

from dashboards.report import build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (`make "
                                "setup` installs Debian's chromium package where apt-get runs)")
WINDOW = (1400, 1600)


def _chromium(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", "--virtual-time-budget=20000",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory):
    """(MLflow UI base URL, experiment id, variant run id, report path): a logged run served by
    an `mlflow server` this module starts and stops (its process group only)."""
    tmp = tmp_path_factory.mktemp("browser")
    _, cfg = make_config(tmp)
    tracker, run_dir = log_run(cfg)
    report = build_report(cfg, run_dir)
    tracker.finish()
    client = MlflowClient(cfg.tracking.uri)
    run, = client.search_runs([tracker.experiment_id], filter_string="tags.variant = 'deltamoe'")
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
        yield base, tracker.experiment_id, run.info.run_id, report
    finally:
        stop_group(server)
        log.close()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_mlflow_ui_shows_the_per_language_metrics(tracked, tmp_path: Path) -> None:
    base, experiment_id, run_id, _ = tracked
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
    *_, report = tracked
    dom = _chromium("--dump-dom", url=report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<td class="best">0.634</td>' in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") == 5
    shot = tmp_path / "report.png"
    assert _chromium(f"--screenshot={shot}", url=report.as_uri()).returncode == 0
    assert _png_size(shot) == WINDOW
