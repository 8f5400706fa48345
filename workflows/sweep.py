"""Multi-language sweeps: one run config → one expansion per language set.

A platform team rarely adds one language: it tries Swahili alone, Swahili with Yoruba, an East
African group... Each set becomes its own run (its own run directory, MLflow parent run and
models) named after the base run and the set, so their results sit side by side in the same
MLflow experiment (tagged ``deltamoe.sweep`` and ``deltamoe.languages``). The data section's
sources stay the base config's, so every run of a sweep reads the same corpora.

A sweep run is the base config plus a few dotted-key overrides (:func:`sweep_overrides`), which is
exactly what ``deltamoe run CONFIG --set KEY=VALUE`` takes: a cluster job reproduces a sweep run
from the base config file and its overrides, with no generated file to ship. ``deltamoe sweep``
runs the expansions one after the other (:func:`run_sweep`) and prints :func:`sweep_summary`;
``deltamoe sweep --submit`` submits each set as its own Ray job so they run side by side
(:func:`plan_sweep_jobs`), and ``deltamoe sweep-summary`` collects the finished runs' evaluation
tables from MLflow (:func:`collect_sweep`, :func:`records_summary`), where the jobs logged them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from components.config import ConfigError, RunConfig
from components.languages import canonical_tag

__all__ = ["LanguageSets", "SweepRecord", "SweepRun", "collect_sweep", "expand_sweep",
           "plan_sweep_jobs", "records_summary", "run_sweep", "set_name", "sweep_overrides",
           "sweep_runs", "sweep_summary"]

if TYPE_CHECKING:
    from workflows.submit import Plan

log = logging.getLogger(__name__)

LanguageSets = Sequence[Sequence[str]] | Mapping[str, Sequence[str]]
"""A list of language sets (named after their languages) or a mapping name → set."""

SWEEP_TAG = "deltamoe.sweep"
LANGUAGES_TAG = "deltamoe.languages"
EVAL_STAGE = "evaluate"
"""The stage run (``deltamoe.stage`` tag) whose ``eval/results.json`` table holds every row."""
EVAL_TABLE = "eval/results.json"
_HEADER = ["| run | new languages | {state} | variant | task | metric | original | expanded |",
           "|---|---|---|---|---|---|---|---|"]


def set_name(tags: Sequence[str]) -> str:
    """``[swh_Latn, yor_Latn]`` → ``swh-yor`` (the script is kept when two tags share a code)."""
    codes = [t.split("_", 1)[0] for t in tags]
    if len(set(codes)) < len(codes):
        codes = [t.replace("_", "-").lower() for t in tags]
    return "-".join(codes)


def _normalise(language_sets: LanguageSets) -> list[tuple[str, list[str]]]:
    """(name, canonical tags) per set; bad tags, empty sets and duplicates are ConfigErrors."""
    items = (list(language_sets.items()) if isinstance(language_sets, Mapping)
             else [(None, s) for s in language_sets])
    if not items:
        raise ConfigError([("language_sets", "expected at least one language set")])
    out: list[tuple[str, list[str]]] = []
    issues: list[tuple[str, str]] = []
    for i, (name, tags) in enumerate(items):
        where = f"language_sets.{name if name is not None else i}"
        if isinstance(tags, str) or not tags:
            issues.append((where, f"expected a non-empty list of languages, got {tags!r}"))
            continue
        try:
            canon = list(dict.fromkeys(canonical_tag(t) for t in tags))
        except ValueError as err:
            issues.append((where, str(err)))
            continue
        out.append((name or set_name(canon), canon))
    seen: dict[str, int] = {}
    for name, _ in out:
        seen[name] = seen.get(name, 0) + 1
    issues += [(f"language_sets.{n}", "named more than once") for n, c in seen.items() if c > 1]
    if issues:
        raise ConfigError(issues)
    return out


def sweep_overrides(cfg: RunConfig, name: str, languages: Sequence[str]) -> dict[str, Any]:
    """The dotted-key overrides that turn ``cfg`` into the sweep run ``name`` adding
    ``languages``: a run name, ``languages.new``, tags, and every per-language table of the
    config restricted to the run's languages (mix ratios, token budgets, expert allocation and
    language groups, LID thresholds, per-language filters). Values are plain JSON, so they can
    travel as ``--set KEY=VALUE``.

    Raises ConfigError when the set overlaps the original languages; a sweep never changes the
    data sources, so one whose ``languages`` names only dropped languages is an error too.
    """
    new = [canonical_tag(t) for t in languages]
    keep = set(cfg.languages.original) | set(new)
    clash = sorted(set(new) & set(cfg.languages.original))
    if clash:
        raise ConfigError([(f"language_sets.{name}",
                            f"{', '.join(clash)} already in languages.original")])
    for i, src in enumerate(cfg.data.sources):
        if src.languages is not None and not keep & set(src.languages):
            raise ConfigError([(f"data.sources.{i}.languages",
                                f"source {src.name!r} holds none of the languages of sweep run "
                                f"{name!r} ({', '.join(sorted(keep))})")])
    alloc = cfg.upcycle.allocation
    groups = {g: [t for t in members if t in keep] for g, members in alloc.groups.items()}
    groups = {g: members for g, members in groups.items() if members}
    overrides: dict[str, Any] = {
        "run_name": f"{cfg.run_name}-{name}",
        "languages.new": new,
        "tracking.tags": {**cfg.tracking.tags, SWEEP_TAG: cfg.run_name,
                          LANGUAGES_TAG: ",".join(new)},
        "data.mix.ratios": {t: r for t, r in cfg.data.mix.ratios.items() if t in keep},
        "data.mix.tokens_per_language": {t: n for t, n in
                                         cfg.data.mix.tokens_per_language.items() if t in keep},
        "data.lid.thresholds": {t: v for t, v in cfg.data.lid.thresholds.items() if t in keep},
        "data.filters.per_language": {
            t: f.model_dump(mode="json") for t, f in cfg.data.filters.per_language.items()
            if t in keep},
        "upcycle.allocation.groups": groups,
        "upcycle.allocation.experts": {
            k: list(ids) for k, ids in alloc.experts.items()
            if k in groups or (k not in alloc.groups and canonical_tag(k) in keep)},
    }
    narrowed = [(i, [t for t in src.languages if t in keep])
                for i, src in enumerate(cfg.data.sources)
                if src.languages is not None and not set(src.languages) <= keep]
    if narrowed:
        # The sources list is replaced as a whole by an override; only the language filter of a
        # source changes, and the masked JSON dump would lose credentials, so refuse those.
        if any(src.storage_options for src in cfg.data.sources):
            raise ConfigError([("data.sources", "a sweep that narrows a source's `languages` "
                                "cannot carry storage_options credentials through --set; list "
                                "the source without `languages` or split it per language")])
        sources = cfg.model_dump(mode="json")["data"]["sources"]
        for i, tags in narrowed:
            sources[i]["languages"] = tags
        overrides["data.sources"] = sources
    return overrides


def _apply(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    data = cfg.model_dump(mode="python")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = json.loads(json.dumps(value))
    try:
        out = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([(".".join(map(str, e["loc"])), e["msg"])
                           for e in err.errors(include_url=False)]) from None
    issues = out.cross_section_issues()
    if issues:
        raise ConfigError(issues)
    return out


def expand_sweep(cfg: RunConfig, language_sets: LanguageSets) -> list[RunConfig]:
    """One validated RunConfig per language set, in order, with distinct run names.

    Pure: nothing is read or written. ``language_sets`` is a list of sets (``[["swh_Latn"],
    ["rus_Cyrl", "ukr_Cyrl"]]``, named ``swh`` and ``rus-ukr``) or a mapping of names to sets.
    """
    return [_apply(cfg, sweep_overrides(cfg, name, tags))
            for name, tags in _normalise(language_sets)]


def sweep_runs(cfg: RunConfig, language_sets: LanguageSets) -> list[tuple[str, dict[str, Any]]]:
    """(run name, overrides) per set: what a submitter passes to ``deltamoe run --set``."""
    out = []
    for name, tags in _normalise(language_sets):
        overrides = sweep_overrides(cfg, name, tags)
        _apply(cfg, overrides)  # validate before anything is submitted
        out.append((overrides["run_name"], overrides))
    return out


@dataclass
class SweepRun:
    """One run of a sweep: its config and either the workflow's result or why it failed."""

    cfg: RunConfig
    result: Any = None
    error: str | None = None


def run_sweep(cfg: RunConfig, language_sets: LanguageSets, *, from_stage: str | None = None,
              only: tuple[str, ...] = ()) -> list[SweepRun]:
    """Run the workflow for every set in turn; a failing run is recorded and the next one runs
    (the summary shows it, the caller exits non-zero)."""
    from workflows.expand import run_workflow

    runs = [SweepRun(c) for c in expand_sweep(cfg, language_sets)]
    for run in runs:
        log.info("sweep run %s: adding %s", run.cfg.run_name, ", ".join(run.cfg.languages.new))
        try:
            run.result = run_workflow(run.cfg, from_stage=from_stage, only=only)
        except Exception as err:  # reported per run; the sweep goes on to the next set
            log.exception("sweep run %s failed", run.cfg.run_name)
            run.error = f"{type(err).__name__}: {err}"
    return runs


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _rows_lines(head: str, state: str, evaluated: Mapping[str, Any], original: Sequence[str],
                new: Sequence[str]) -> list[str]:
    """One table line per (variant, task's primary metric) of a run, or one saying none."""
    from components.evaluate.results import comparison_rows

    rows = comparison_rows(evaluated, original, new)
    if not rows:
        return [f"{head} {state} | – | not evaluated | | | |"]
    return [f"{head} {state} | {row['variant']} | {row['task']} | {row['metric']} | "
            f"{_fmt(row['original'])} | {_fmt(row['new'])} |" for row in rows]


def sweep_summary(runs: Sequence[SweepRun]) -> str:
    """Markdown comparing the runs: per run, its stages, and per evaluated variant the
    original- and expanded-language averages of each task's primary metric."""
    lines = [_HEADER[0].format(state="stages"), _HEADER[1]]
    for run in runs:
        head = f"| {run.cfg.run_name} | {', '.join(run.cfg.languages.new)} |"
        if run.error is not None:
            lines.append(f"{head} failed: {run.error.splitlines()[0][:120]} | | | | | |")
            continue
        states = list(run.result.stages.values())
        built = sum(s == "built" for s in states)
        lines += _rows_lines(head, f"{len(states)} ({built} built)", run.result.evaluated or {},
                             run.cfg.languages.original, run.cfg.languages.new)
    return "\n".join(lines)


def plan_sweep_jobs(config: Path, cfg: RunConfig, language_sets: LanguageSets, *,
                    overrides: Mapping[str, Any] | None = None, **plan_options: Any) -> list[Plan]:
    """One submission :class:`~workflows.submit.Plan` per set (the base file plus the set's
    overrides), every one resolved and checked before any is submitted. ``plan_options`` go to
    :func:`workflows.submit.plan_submission` (working dir, env, run args ...)."""
    from workflows.submit import plan_submission

    return [plan_submission(config, overrides={**(overrides or {}), **run_overrides},
                            **plan_options)
            for _, run_overrides in sweep_runs(cfg, language_sets)]


@dataclass(frozen=True)
class SweepRecord:
    """One run of a sweep as MLflow has it: the parent run's status and, once it finished, its
    evaluation rows per variant (None: no evaluation table)."""

    run_name: str
    new: list[str]
    status: str
    """MLflow's status of the parent run (SCHEDULED: submitted, not started), or MISSING."""
    evaluated: dict[str, list[Any]] | None = None


_STATES = {"FINISHED": "finished", "RUNNING": "running", "SCHEDULED": "submitted, not started",
           "FAILED": "failed", "KILLED": "stopped", "MISSING": "not in MLflow"}


def _eval_table(client: Any, experiment_id: str, parent_id: str) -> dict[str, list[Any]] | None:
    """The rows of the run's evaluate stage table, per variant; None when it has none."""
    from mlflow.exceptions import MlflowException

    from components.evaluate.results import ResultRow

    stages = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`deltamoe.stage` = '{EVAL_STAGE}'"),
        max_results=1)
    if not stages:
        return None
    with tempfile.TemporaryDirectory(prefix="sweep-summary-") as tmp:
        try:
            path = client.download_artifacts(stages[0].info.run_id, EVAL_TABLE, tmp)
        except (MlflowException, OSError):
            return None
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    out: dict[str, list[Any]] = {}
    for values in table["data"]:
        row = dict(zip(table["columns"], values, strict=True))
        out.setdefault(row["variant"], []).append(ResultRow(
            row["task"], row["lang"], row["metric"], float(row["value"]),
            None if row.get("stderr") is None else float(row["stderr"]), int(row["n"])))
    return out


def collect_sweep(tracking_uri: str, experiment: str, sweep: str,
                  run_names: Sequence[str] | None = None) -> list[SweepRecord]:
    """Every run of the sweep ``sweep`` (the base run name) in MLflow, or those of
    ``run_names`` in that order (MISSING when MLflow has none), with the finished runs' tables.
    Runs submitted as separate Ray jobs meet here: each logged its own parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    found = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=(f"tags.`{SWEEP_TAG}` = '{sweep}' and "
                                            "tags.`deltamoe.kind` = 'expansion'"),
        order_by=["attributes.start_time ASC"], max_results=5000)
    by_name: dict[str, Any] = {}
    for run in found:
        by_name.setdefault(run.data.tags.get("deltamoe.run_name", run.info.run_name), run)
    records = []
    for name in (list(run_names) if run_names is not None else sorted(by_name)):
        run = by_name.get(name)
        if run is None:
            records.append(SweepRecord(name, [], "MISSING"))
            continue
        new = [t for t in run.data.tags.get(LANGUAGES_TAG, "").split(",") if t]
        table = (_eval_table(client, run.info.experiment_id, run.info.run_id)
                 if run.info.status == "FINISHED" else None)
        records.append(SweepRecord(name, new, run.info.status, table))
    return records


def records_summary(records: Sequence[SweepRecord], original: Sequence[str]) -> str:
    """Markdown of :func:`collect_sweep`: the finished runs' comparison rows, as
    :func:`sweep_summary` has them, and the state of every other run."""
    lines = [_HEADER[0].format(state="status"), _HEADER[1]]
    for rec in records:
        head = f"| {rec.run_name} | {', '.join(rec.new) or '–'} |"
        state = _STATES.get(rec.status, rec.status.lower())
        if rec.status != "FINISHED":
            lines.append(f"{head} {state} | | | | | |")
            continue
        lines += _rows_lines(head, state, rec.evaluated or {}, original, rec.new)
    return "\n".join(lines)
