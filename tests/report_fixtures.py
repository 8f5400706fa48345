"""An expansion run as the workflow leaves it in MLflow and on disk, written with the project's
own tracker: a parent run, stage runs, variant runs tagged ``variant=<name>`` with
``eval/<task>/<lang>/<metric>`` and ``router/load/<layer>/<expert>/<lang>`` metrics, and stage
folders with manifests. Used by the report and browser tests (the eval stage itself is tested
elsewhere; these numbers are chosen so that the tests can assert them)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from components.config import RunConfig, load_config
from components.evaluate.results import ResultRow, write_results
from components.storage import RunDir, fingerprint
from components.tracking import ExpansionTracker, RankZeroLogger
from workflows.cli import DEMO_CONFIG

ORIGINAL = ["eng_Latn", "deu_Latn"]
NEW = ["swh_Latn", "rus_Cyrl"]
# variant → lang → (accuracy, word perplexity)
SCORES = {
    "post": {"eng_Latn": (0.812, 11.5), "deu_Latn": (0.774, 13.25),
             "swh_Latn": (0.281, 95.0), "rus_Cyrl": (0.266, 120.5)},
    "deltamoe": {"eng_Latn": (0.803, 11.75), "deu_Latn": (0.769, 13.5),
                 "swh_Latn": (0.634, 21.0), "rus_Cyrl": (0.597, 24.25)},
}
ROUTER = {1: {"eng_Latn": [0.7, 0.1, 0.1, 0.1], "swh_Latn": [0.1, 0.5, 0.3, 0.1]}}
ITEMS = 32  # questions per language, as the demo evaluates


def acc_stderr(acc: float, n: int = ITEMS) -> float:
    """lm-eval's stderr of a mean of 0/1 scores (sample standard deviation / √n)."""
    return math.sqrt(acc * (1 - acc) / (n - 1))


def make_config(tmp_path: Path, run_name: str = "reported") -> tuple[Path, RunConfig]:
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["run_name"] = run_name
    cfg["storage"]["root"] = str(tmp_path / "runs")
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, load_config(path, env={})


def log_run(cfg: RunConfig, with_results: bool = True) -> tuple[ExpansionTracker, RunDir]:
    """Log the run into ``cfg.tracking.uri`` and write two stage folders; the tracker is left
    open (the parent RUNNING) like a workflow at its report stage."""
    run_dir = RunDir(cfg.storage.root, cfg.run_name)
    tracker = ExpansionTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run_name)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    for stage, files in (("world", {"a.txt": "world"}), ("models/post", {"w.bin": "x" * 2048})):
        with tracker.stage(stage) as logger:
            with run_dir.stage(stage).build(fingerprint(stage), inputs={"seed": 0}) as work:
                for name, text in files.items():
                    (work.path / name).write_text(text)
            logger.log_metrics({f"{stage}/files": float(len(files))}, step=0)
    if with_results:
        for variant, by_lang in SCORES.items():
            run_id = tracker.stage_run_id(f"eval_{variant}")
            logger = RankZeroLogger(tracker.tracking_uri, run_id, rank=0)
            logger.set_tags({"variant": variant})
            metrics = {}
            for lang, (acc, ppl) in by_lang.items():
                metrics[f"eval/synthetic_mc/{lang}/acc"] = acc
                metrics[f"eval/synthetic_ppl/{lang}/word_perplexity"] = ppl
            if variant == "deltamoe":
                metrics.update({f"router/load/{layer}/{e}/{lang}": share
                                for layer, by in ROUTER.items() for lang, row in by.items()
                                for e, share in enumerate(row)})
            logger.log_metrics(metrics, step=0)
            tracker.client.set_terminated(run_id, status="FINISHED")
        # the eval stage's rows: what MLflow has, plus stderr and n (word perplexity: none)
        with tracker.stage("evaluate"), run_dir.stage("eval").build(fingerprint("eval")) as work:
            for variant, by_lang in SCORES.items():
                write_results(work.path / f"{variant}.json", variant, [
                    row for lang, (acc, ppl) in by_lang.items() for row in (
                        ResultRow("synthetic_mc", lang, "acc", acc, acc_stderr(acc), ITEMS),
                        ResultRow("synthetic_ppl", lang, "word_perplexity", ppl, None, ITEMS))])
    return tracker, run_dir
