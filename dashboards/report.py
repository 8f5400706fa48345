"""The HTML report of an expansion run, built from MLflow and the run directory's manifests.

One self-contained file (figures embedded as PNG data URIs, no external assets) that a platform
team can open from a laptop, an artifact store or a CI page: a summary (what was expanded, the
headline comparison as a difference with its 95 % interval, the run's status as its stages tell
it), the configuration that made it, a legend of the variants, per-language evaluation tables
with stderr and n in every cell (a cell is marked only when it beats the others beyond noise,
:mod:`dashboards.summary`), original/expanded averages, router load heat maps with the allocated
experts outlined, the stages with their MLflow status, and the lineage of every output recorded
in the stage manifests. Scores come from the run directory's result rows (``eval/<variant>.json``,
which carry stderr and n) where it has them, else from the variant runs' MLflow metrics; so the
report works for a run still in progress (it says which results are missing) and for any run
another machine executed against the same tracking server.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components.config import RunConfig
from components.evaluate.results import LOWER_IS_BETTER, ResultRow
from components.storage import Manifest, RunDir, fingerprint
from components.tracking import RankZeroLogger, resolve_tracking_uri
from dashboards.summary import config_summary, group_mean, headline, legend, marked_best, run_status

__all__ = ["ReportData", "ReportError", "build_report", "collect", "render", "report_child_logger",
           "report_run"]

TEMPLATES = Path(__file__).parent / "templates"
STAGE = "report"
_RUN_TAG = "deltamoe.run_name"
_KIND_TAG = "deltamoe.kind"
_STAGE_TAG = "deltamoe.stage"


class ReportError(LookupError):
    """No such run in MLflow (or no MLflow store where one was expected)."""


@dataclass
class ReportData:
    """Everything the report shows, as plain data (also what its fingerprint hashes)."""

    run_name: str
    tracking_uri: str
    experiment: str
    parent: dict[str, Any]
    original: list[str]
    new: list[str]
    stages: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, list[ResultRow]] = field(default_factory=dict)
    routing: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    allocation: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant → its file

    def fingerprint(self) -> str:
        rows = {v: [r.to_dict() for r in rs] for v, rs in self.results.items()}
        return fingerprint("report/2", self.parent, self.stages, rows, self.routing,
                           self.lineage, self.original, self.new, self.params, self.allocation)


def _parent_run(client: MlflowClient, run_name: str, experiment: str | None) -> Any:
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=(f"tags.`{_RUN_TAG}` = '{run_name}' and "
                                                  f"tags.`{_KIND_TAG}` = 'expansion'"),
                              order_by=["attributes.start_time ASC"], max_results=1) if ids else []
    if not runs:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise ReportError(f"no expansion run {run_name!r} in {where} of {client.tracking_uri}")
    return runs[0]


def _languages(params: Mapping[str, str], key: str) -> list[str]:
    try:
        value = json.loads(params.get(key, "[]"))
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


_LANG_TAG = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


def metric_key(key: str) -> tuple[str, str, str] | None:
    """(task, lang, metric) of a per-language evaluation metric key, or None. The one place
    that knows MLflow's key layout: ``eval/<task>/<lang>/<metric>``, and any order of the
    segments after ``eval/<task>/`` that keeps the language tag as one segment; averages
    (``avg_*``) and stderr keys are not per-language scores."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "eval" or any(p.startswith("avg_") for p in parts):
        return None
    langs = [i for i, p in enumerate(parts[2:], 2) if _LANG_TAG.match(p)]
    if len(langs) != 1 or parts[-1].endswith("stderr"):
        return None
    rest = [p for i, p in enumerate(parts[2:], 2) if i != langs[0]]
    return parts[1], parts[langs[0]], "/".join(rest)


def _eval_rows(metrics: Mapping[str, float]) -> list[ResultRow]:
    """The variant runs' per-language metrics as rows (no stderr or n: MLflow holds values)."""
    rows = []
    for key, value in sorted(metrics.items()):
        parsed = metric_key(key)
        if parsed is not None:
            rows.append(ResultRow(*parsed, float(value), None, 0))
    return rows


def _stored_rows(run_dir: RunDir | None, variant: str) -> list[ResultRow] | None:
    """The variant's result rows in the run directory (with stderr and n), if it has them."""
    if run_dir is None:
        return None
    for stage, name in (("eval", f"{variant}.json"), (f"eval_parts/{variant}", "results.json")):
        folder = run_dir.stage(stage)
        if folder.read_manifest() is None:
            continue
        try:
            with folder.fs.open(f"{folder.path}/{name}", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            continue
        try:
            return [ResultRow(**row) for row in json.loads(data)["rows"]]
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _allocation(run_dir: RunDir | None, variant: str) -> dict[str, Any]:
    """``models/<variant>/allocation.json`` (the graft copies its target's), or {}."""
    if run_dir is None:
        return {}
    folder = run_dir.stage(f"models/{variant}")
    try:
        with folder.fs.open(f"{folder.path}/allocation.json", "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (FileNotFoundError, ValueError):
        return {}
    return {"experts": data.get("experts", {}), "groups": data.get("groups", {})} \
        if isinstance(data, dict) else {}


def _routing(metrics: Mapping[str, float]) -> dict[int, dict[str, list[float]]]:
    """``router/load/<layer>/<expert>/<lang>`` → {layer: {lang: [share per expert]}}."""
    cells: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 5 and parts[:2] == ["router", "load"]:
            try:
                cells[int(parts[2])][parts[4]][int(parts[3])] = float(value)
            except ValueError:
                continue
    return {layer: {lang: [by.get(e, 0.0) for e in range(max(by) + 1)]
                    for lang, by in sorted(langs.items())}
            for layer, langs in sorted(cells.items())}


def _manifests(run_dir: RunDir) -> Iterable[tuple[str, Manifest]]:
    """Every completed stage folder, one level deep (``models/<variant>``, ``eval_parts/<v>``)."""
    fs, root = run_dir.fs, run_dir.uri
    try:
        entries = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if ".tmp" in name or not fs.isdir(entry):
            continue
        manifest = run_dir.stage(name).read_manifest()
        if manifest is not None:
            yield name, manifest
            continue
        for sub in sorted(fs.ls(entry, detail=False)):
            sub_name = f"{name}/{sub.rstrip('/').rsplit('/', 1)[-1]}"
            if fs.isdir(sub) and (m := run_dir.stage(sub_name).read_manifest()) is not None:
                yield sub_name, m


def _lineage(run_dir: RunDir | None) -> list[dict[str, Any]]:
    out = []
    for name, m in _manifests(run_dir) if run_dir is not None else ():
        if name == STAGE:
            continue
        out.append({"stage": name, "fingerprint": m.fingerprint[:12],
                    "inputs": {k: (v if isinstance(v, str) else json.dumps(v, default=str))
                               for k, v in m.inputs.items()},
                    "files": len(m.outputs), "bytes": m.total_bytes,
                    "finished": m.timings.get("finished_at", ""),
                    "seconds": m.timings.get("seconds")})
    return out


def collect(tracking_uri: str, run_name: str, run_dir: RunDir | None = None, *,
            experiment: str | None = None, original: Sequence[str] | None = None,
            new: Sequence[str] | None = None) -> ReportData:
    """Read the expansion ``run_name`` from MLflow (and its manifests from ``run_dir``)."""
    client = MlflowClient(tracking_uri)
    parent = _parent_run(client, run_name, experiment)
    exp = client.get_experiment(parent.info.experiment_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = "
                                            f"'{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    params = parent.data.params
    data = ReportData(
        run_name=run_name, tracking_uri=tracking_uri, experiment=exp.name,
        parent={"run_id": parent.info.run_id, "status": parent.info.status,
                "fingerprint": parent.data.tags.get("deltamoe.config_fingerprint", "")[:12]},
        original=list(original or _languages(params, "languages.original")),
        new=list(new or _languages(params, "languages.new")),
        lineage=_lineage(run_dir), params=dict(params))
    for run in runs:
        info, tags = run.info, run.data.tags
        if tags.get(_STAGE_TAG) == STAGE:
            continue  # the report's own run: still open while it is being built
        seconds = ((info.end_time - info.start_time) / 1000
                   if info.end_time and info.start_time else None)
        data.stages.append({"name": tags.get(_STAGE_TAG, info.run_name), "status": info.status,
                            "seconds": seconds, "metrics": len(run.data.metrics),
                            "variant": tags.get("variant", ""),
                            "tokens": run.data.metrics.get("train/tokens")})
        variant = tags.get("variant")
        if variant:
            rows = _eval_rows(run.data.metrics)
            if rows:
                stored = _stored_rows(run_dir, variant) or []
                have = {(r.task, r.lang, r.metric) for r in stored}
                data.results[variant] = stored + [r for r in rows
                                                  if (r.task, r.lang, r.metric) not in have]
                if (alloc := _allocation(run_dir, variant)):
                    data.allocation[variant] = alloc
            load = _routing(run.data.metrics)
            if load:
                data.routing[variant] = load
    return data


def _tables(data: ReportData) -> list[dict[str, Any]]:
    """One table per (task, metric): variants × languages, each cell value ± stderr over n; a
    cell is marked only when it beats every other variant's beyond noise."""
    langs = [*data.original, *data.new]
    keys = sorted({(r.task, r.metric) for rows in data.results.values() for r in rows})
    tables = []
    for task, metric in keys:
        cells = {v: {r.lang: r for r in rows if (r.task, r.metric) == (task, metric)}
                 for v, rows in data.results.items()}
        columns = [lang for lang in langs if any(lang in by for by in cells.values())]
        columns += sorted({lang for by in cells.values() for lang in by} - set(columns))
        best = {lang: marked_best({v: (by[lang].value, by[lang].stderr) for v, by in
                                   cells.items() if lang in by}, metric) for lang in columns}
        groups = {v: {g: group_mean([r for r in by.values() if r.lang in members])
                      for g, members in (("original", data.original), ("new", data.new))}
                  for v, by in cells.items()}
        best_avg = {g: marked_best({v: by[g][:2] for v, by in groups.items()
                                    if by[g][0] is not None}, metric)
                    for g in ("original", "new")}
        tables.append({
            "task": task, "metric": metric, "columns": columns,
            "direction": "lower is better" if metric in LOWER_IS_BETTER else "higher is better",
            "new": set(data.new),
            "rows": [{"variant": v,
                      "cells": [(by.get(lang), best[lang] == v) for lang in columns],
                      "original": (*groups[v]["original"], best_avg["original"] == v),
                      "expanded": (*groups[v]["new"], best_avg["new"] == v)}
                     for v, by in cells.items()]})
    return tables


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figures(data: ReportData, folder: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    from dashboards.figures import plot_averages, plot_routing_allocated, plot_scores

    scores, heatmaps = [], []
    langs = [*data.original, *data.new]
    for i, (task, metric) in enumerate(sorted({(r.task, r.metric) for rows in
                                               data.results.values() for r in rows})):
        path = plot_scores(data.results, task, metric, langs, folder / f"s{i}.png")
        scores.append({"title": f"{task}: {metric} per language", "src": _png(path)})
        if data.original and data.new:
            path = plot_averages(data.results, task, metric, data.original, data.new,
                                 folder / f"a{i}.png")
            scores.append({"title": f"{task}: {metric}, original vs expanded", "src": _png(path)})
    for i, (variant, load) in enumerate(sorted(data.routing.items())):
        alloc = data.allocation.get(variant) or _configured_allocation(data, variant)
        path = plot_routing_allocated(load, f"{variant}: expert load per layer and language",
                                      folder / f"r{i}.png", alloc.get("experts"),
                                      alloc.get("groups"))
        heatmaps.append({"title": f"router load: {variant}" + (
            " (outlined: the experts allocated to the language)" if alloc.get("experts")
            else ""), "src": _png(path)})
    return scores, heatmaps


def _configured_allocation(data: ReportData, variant: str) -> dict[str, Any]:
    """The config's language allocation, for a variant upcycled with it (no model folder read)."""
    from components.variants import VARIANTS

    spec = VARIANTS.get(variant)
    onto = VARIANTS.get(spec.graft_onto) if spec is not None and spec.graft_onto else spec
    if onto is None or onto.upcycle != "language":
        return {}
    out: dict[str, Any] = {"experts": {}, "groups": {}}
    for key, raw in data.params.items():
        for section in ("experts", "groups"):
            prefix = f"upcycle.allocation.{section}."
            if key.startswith(prefix):
                try:
                    out[section][key[len(prefix):]] = json.loads(raw)
                except ValueError:
                    continue
    return out


def render(data: ReportData, *, figures: bool = True) -> str:
    """The report as one HTML document."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "–" if v is None else f"{v:.4g}"
    env.filters["signed"] = lambda v: "–" if v is None else f"{v:+.3g}"
    env.filters["se"] = lambda v: "–" if v is None else f"{v:.2g}"
    shown = [*data.results, *(v for v in data.routing if v not in data.results)]
    with tempfile.TemporaryDirectory(prefix="deltamoe-report-") as tmp:
        scores, heatmaps = _figures(data, Path(tmp)) if figures else ([], [])
        return env.get_template("report.html.jinja").render(
            d=data, tables=_tables(data), scores=scores, heatmaps=heatmaps,
            head=headline(data.results, data.original, data.new),
            status=run_status(data.parent["status"], data.stages),
            config=config_summary(data.params, data.stages), legend=legend(shown),
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))


def report_run(run_name: str, run_dir: RunDir, tracking_uri: str, *,
               experiment: str | None = None, original: Sequence[str] | None = None,
               new: Sequence[str] | None = None,
               logger: RankZeroLogger | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` (atomically; skipped when MLflow and the manifests
    hold nothing new) and log it as an MLflow artifact of ``logger``'s run. Returns the path of
    the report, local to this machine (a temporary copy when the run directory is remote)."""
    data = collect(tracking_uri, run_name, run_dir, experiment=experiment, original=original,
                   new=new)
    stage = run_dir.stage(STAGE)
    fp = data.fingerprint()
    html = None
    if not stage.is_complete(fp):
        html = render(data)
        with stage.build(fp, inputs={"mlflow_run": data.parent["run_id"]}) as work:
            (work.path / "index.html").write_text(html, encoding="utf-8")
            work.extra["report"] = {"variants": sorted(data.results),
                                    "routing": sorted(data.routing)}
    if stage.is_local:
        path = Path(stage.path) / "index.html"
    else:
        path = Path(tempfile.mkdtemp(prefix="deltamoe-report-")) / "index.html"
        with stage.fs.open(f"{stage.path}/index.html", "rb") as src:
            path.write_bytes(src.read())
    if logger is not None and logger.is_rank_zero:
        logger.client.log_artifact(logger.run_id, str(path), STAGE)
    return path


def build_report(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger | None = None
                 ) -> Path:
    """The workflow's report stage: the report of ``cfg``'s run, logged to ``logger``'s run."""
    return report_run(cfg.run_name, run_dir, resolve_tracking_uri(cfg.tracking.uri, run_dir),
                      experiment=cfg.tracking.experiment, original=cfg.languages.original,
                      new=cfg.languages.new, logger=logger)


def report_child_logger(tracking_uri: str, run_name: str,
                        experiment: str | None = None) -> RankZeroLogger:
    """The ``report`` child run of an existing expansion (created on first use), for reports
    built outside the workflow (``deltamoe report``); never creates or reopens the parent."""
    client = MlflowClient(tracking_uri)
    parent = _parent_run(client, run_name, experiment)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and "
                       f"tags.`{_STAGE_TAG}` = '{STAGE}'"), max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(parent.info.experiment_id, run_name=STAGE, tags={
            MLFLOW_PARENT_RUN_ID: parent.info.run_id, _STAGE_TAG: STAGE, _RUN_TAG: run_name,
            _KIND_TAG: "stage"}).info.run_id
        client.set_terminated(run_id, status="FINISHED")
    return RankZeroLogger(tracking_uri, run_id, rank=0)
