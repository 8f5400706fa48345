"""The paper's comparison at toy scale: every variant, several seeds, mean ± std per language group.

Each seed is one independent replicate of the whole expansion on the synthetic world: the world
(corpora, facts, the tiny model), the base pre-training, the post-training, the continued
pre-training and the graft all take that seed, so the error bars cover the world as well as the
optimisation. The settings come from one config fixed before any result is seen
(``workflows/configs/reproduce.yaml``); this module only runs it and reports what comes out.

Scores are averaged over the run's original languages and over its new languages separately,
per seed, then summarised over seeds: the paper reports these two averages side by side, since
the claim is "better on the new languages while keeping the original ones".
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.config import ConfigError, RunConfig
from components.evaluate.gates import ComparisonPlan, GateResult
from components.evaluate.results import higher_is_better
from components.storage import RunDir, fingerprint
from components.tracking import ExpansionTracker, resolve_tracking_uri
from components.variants import VARIANTS
from workflows.comparison import (
    PairedRow,
    SeedItems,
    collect_items,
    gate_rows,
    gates_table,
    headline_row,
    headline_text,
    mean_over_seeds,
    needed_variants,
    paired_rows,
    paired_table,
    seed_cells,
)

log = logging.getLogger(__name__)

STAGE = "reproduce"
GROUPS = ("original", "new")
# The order rows appear in: the registry's (the model pair, the dense route, the MoE route).
VARIANT_ORDER = tuple(VARIANTS)

Rows = Sequence[Mapping[str, Any]]
Key = tuple[str, str, str]  # (task, metric, group)


@dataclass(frozen=True)
class Cell:
    """One table cell: a score over seeds."""

    mean: float
    std: float
    n: int

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "—"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def seed_config(cfg: RunConfig, seed: int, tracking_uri: str | None = None) -> RunConfig:
    """The replicate of ``cfg`` for one seed: its own run folder, the same MLflow store."""
    update: dict[str, Any] = {
        "run_name": f"{cfg.run_name}-seed{seed}",
        "seed": seed,
        "graft": cfg.graft.model_copy(update={"seed": seed}),
    }
    if cfg.world is not None:
        update["world"] = cfg.world.model_copy(update={"seed": seed})
    if tracking_uri is not None and cfg.tracking.uri is None:
        update["tracking"] = cfg.tracking.model_copy(update={"uri": tracking_uri})
    return cfg.model_copy(update=update)


def language_averages(rows: Rows, original: Iterable[str],
                      new: Iterable[str]) -> dict[Key, float]:
    """Average each (task, metric) over the original languages and over the new ones.

    Rows without a language (aggregate rows of a suite) and stderr-like metrics are left out; a
    group with no row for a (task, metric) gets no entry rather than a made-up zero.
    """
    groups = {"original": set(original), "new": set(new)}
    values: dict[Key, list[float]] = {}
    for item in rows:
        row = item if isinstance(item, Mapping) else item.to_dict()  # ResultRow or its JSON
        lang, metric = row.get("lang"), str(row.get("metric", ""))
        if not lang or metric.endswith("_stderr") or row.get("value") is None:
            continue
        for group, members in groups.items():
            if lang in members:
                values.setdefault((str(row["task"]), metric, group), []).append(float(row["value"]))
    return {key: sum(v) / len(v) for key, v in values.items()}


def aggregate(per_seed: Sequence[Mapping[str, Rows]], original: Iterable[str],
              new: Iterable[str]) -> dict[str, dict[Key, Cell]]:
    """variant → (task, metric, group) → mean ± sample std over the seeds that have it."""
    original, new = list(original), list(new)
    collected: dict[str, dict[Key, list[float]]] = {}
    for evaluated in per_seed:
        for variant, rows in evaluated.items():
            for key, value in language_averages(rows, original, new).items():
                collected.setdefault(variant, {}).setdefault(key, []).append(value)
    return {variant: {key: Cell(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0,
                                len(v))
                      for key, v in cells.items()}
            for variant, cells in collected.items()}


def _ordered(variants: Iterable[str]) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + sorted(v for v in variants if v not in VARIANT_ORDER)


def _arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def markdown_table(agg: Mapping[str, Mapping[Key, Cell]], digits: int = 3,
                   chance: Mapping[str, float] | None = None) -> str:
    """Variants as rows; each (task, metric) as two columns, original and new languages.

    With ``chance`` (``task/metric`` → the score of guessing) two reference rows close the
    table: chance, and the ceiling (1.0) of those metrics."""
    columns = sorted({(task, metric) for cells in agg.values() for task, metric, _ in cells})
    header = ["variant"] + [f"{task} {metric} {_arrow(metric)} ({group})"
                            for task, metric in columns for group in GROUPS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing = Cell(float("nan"), 0.0, 0)
    for variant in _ordered(agg):
        cells = agg[variant]
        row = [variant] + [cells.get((task, metric, group), missing).text(digits)
                           for task, metric in columns for group in GROUPS]
        lines.append("| " + " | ".join(row) + " |")
    for label, value in (("*chance*", None), ("*ceiling*", 1.0)):
        if not chance:
            break
        measured = {key for cells in agg.values() for key in cells}
        row = [label] + [f"{(chance[f'{task}/{metric}'] if value is None else value):.{digits}f}"
                         if f"{task}/{metric}" in chance and (task, metric, group) in measured
                         else "—" for task, metric in columns for group in GROUPS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass
class ReproduceResult:
    run_dir: str
    tracking_uri: str
    seeds: list[int]
    table: str
    aggregate: dict[str, dict[Key, Cell]]
    runs: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    markdown: str = ""
    gates: list[tuple[GateResult, int]] = field(default_factory=list)
    paired: list[PairedRow] = field(default_factory=list)

    def missing(self, variants: Iterable[str]) -> list[str]:
        """Variants asked for that produced no number at all."""
        return [v for v in variants if not self.aggregate.get(v)]

    @property
    def certified(self) -> bool:
        """Every gate of the plan passed (on the seed means); no plan certifies nothing."""
        return bool(self.gates) and all(result.passed for result, _ in self.gates)


def render_markdown(cfg: RunConfig, result: ReproduceResult, command: str, reading: str,
                    plan: ComparisonPlan | None = None, plan_text: str = "") -> str:
    """The results page: command, gates, tables, the paired differences and the reading."""
    resolved = cfg.model_dump(mode="json", exclude={"tracking", "storage"})
    total = sum(result.seconds.values())
    seeds = len(result.seeds)
    lines = [
        "# DeltaMoE at toy scale: gates, every variant, paired differences over seeds",
        "",
        "Reproduce with:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Seeds: {', '.join(map(str, result.seeds))} (each a replicate of the whole pipeline: "
        f"world, base, post-training, CPT, graft). Wall time of this invocation: {total / 60:.1f} "
        "min (stages an earlier invocation finished are skipped, not rebuilt; per seed: "
        + ", ".join(f"{s / 60:.1f}" for s in result.seconds.values()) + " min). Scores are "
        "averaged over the original languages "
        f"({', '.join(cfg.languages.original)}) and the new ones "
        f"({', '.join(cfg.languages.new)}) per seed, then over seeds. ↑ higher is better, "
        "↓ lower is better.",
        "",
    ]
    if plan is not None:
        verdict = ("every gate passes: the world certifies the comparison below"
                   if result.certified else
                   "**a gate fails: the world does not certify the comparison; its numbers "
                   "are shown, not read**")
        lines += ["## Gates (fixed before the comparison ran)", "",
                  gates_table(result.gates, seeds), "", f"Verdict: {verdict}.", "",
                  headline_text(headline_row(result.paired, plan), plan, result.certified), ""]
    lines += ["## Every variant (mean ± sample std over seeds)", "", result.table, ""]
    if plan is not None:
        lines += [f"## Paired differences ({plan.variant} − baseline, same seed, same items)", "",
                  "Per seed: the group score difference. The t-interval treats seeds as the only "
                  "noise; the bootstrap resamples seeds, then items within each seed and "
                  "language, the same items for both variants. McNemar: exact two-sided test on "
                  "one seed's items (0/1 metrics).", "",
                  paired_table(result.paired, plan.variant), ""]
    lines += ["## Reading", "", reading, ""]
    if plan_text:
        lines += ["## Comparison plan (fixed before the comparison ran)", "", "```yaml",
                  plan_text.rstrip(), "```", ""]
    lines += ["## Configuration (fixed before the results were seen)", "", "```yaml",
              yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def default_reading(result: ReproduceResult) -> str:
    """A plain statement of what the numbers say, written from them and nothing else."""
    lines = []
    for task, metric, group in sorted(result.aggregate.get("deltamoe", {})):
        if group != "new":
            continue
        ranked = sorted(((cells[(task, metric, group)].mean, variant)
                         for variant, cells in result.aggregate.items()
                         if (task, metric, group) in cells and variant not in ("base", "post")),
                        reverse=_arrow(metric) == "↑")
        if not ranked:
            continue
        order = ", ".join(f"{variant} {value:.3f}" for value, variant in ranked)
        lines.append(f"- {task} {metric}, new languages, best first: {order}.")
        original = [(cells[(task, metric, "original")].mean, variant)
                    for variant, cells in result.aggregate.items()
                    if (task, metric, "original") in cells and variant in ("post", "deltamoe",
                                                                             "param_delta")]
        if original:
            lines.append("  Original languages: " + ", ".join(
                f"{variant} {value:.3f}" for value, variant in sorted(original, reverse=True))
                + ".")
    return "\n".join(lines) or "No variant produced comparable numbers."


def run_reproduce(cfg: RunConfig, seeds: Sequence[int], *, command: str,
                  out: str | Path | None = None, reading: str | None = None,
                  plan: ComparisonPlan | None = None, plan_text: str = "") -> ReproduceResult:
    """Run the expansion once per seed, then write the page to the run, MLflow and ``out``.

    With a ``plan`` every seed keeps lm-eval's per-item samples, the plan's gates are checked on
    the seed means and its paired differences are computed from the items."""
    import time

    from workflows.expand import run_workflow

    if not seeds:
        raise ValueError("give at least one seed")
    if plan is not None:
        built = {"base", "post", "deltamoe", *cfg.baselines.variants}
        unbuilt = [v for v in needed_variants(plan) if v not in built]
        if unbuilt:
            raise ConfigError([("baselines.variants", f"the comparison plan reads "
                                f"{', '.join(unbuilt)}, which this config does not build; add "
                                "them here or drop them from the plan")], cfg.run_name)
    if plan is not None and not cfg.evaluation.log_samples:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(
            update={"log_samples": True})})
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, run_dir)
    groups = {"original": list(cfg.languages.original), "new": list(cfg.languages.new)}
    per_seed: list[dict[str, Rows]] = []
    items: list[SeedItems] = []
    result = ReproduceResult(run_dir=run_dir.uri, tracking_uri=tracking_uri, seeds=list(seeds),
                             table="", aggregate={})
    for seed in seeds:
        seed_cfg = seed_config(cfg, seed, tracking_uri)
        log.info("reproduce: seed %d (%s)", seed, seed_cfg.run_name)
        started = time.perf_counter()
        outcome = run_workflow(seed_cfg)
        result.seconds[seed] = time.perf_counter() - started
        result.runs[seed] = outcome.parent_run_id
        if not outcome.evaluated:
            raise RuntimeError(f"seed {seed}: the workflow evaluated nothing "
                               f"(run {seed_cfg.run_name})")
        per_seed.append(outcome.evaluated)
        local = RunDir(seed_cfg.storage.root, seed_cfg.run_name,
                       seed_cfg.storage.storage_options).local_path
        if plan is not None and local is not None:
            items.append(collect_items(local, needed_variants(plan),
                                       list(dict.fromkeys(plan.metrics)), groups))
    result.aggregate = aggregate(per_seed, cfg.languages.original, cfg.languages.new)
    result.table = markdown_table(result.aggregate, chance=plan.chance if plan else None)
    if plan is not None:
        cells = [seed_cells(language_averages_by_variant(rows, groups)) for rows in per_seed]
        result.gates = gate_rows(plan, mean_over_seeds(cells), cells)
        result.paired = paired_rows(items, plan, groups)
    result.markdown = render_markdown(cfg, result, command, reading or default_reading(result),
                                      plan, plan_text)
    _record(cfg, run_dir, tracking_uri, result, per_seed)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(result.markdown, encoding="utf-8")
    return result


def language_averages_by_variant(evaluated: Mapping[str, Rows],
                                 groups: Mapping[str, Sequence[str]]
                                 ) -> dict[str, dict[tuple[str, str, str], float]]:
    """One seed's :func:`language_averages` for every variant."""
    return {variant: language_averages(rows, groups["original"], groups["new"])
            for variant, rows in evaluated.items()}


def _num(value: float | None) -> float | None:
    """A number for JSON: NaN (no interval from one seed, a missing cell) becomes null."""
    return None if value is None or math.isnan(value) else value


def _record(cfg: RunConfig, run_dir: RunDir, tracking_uri: str, result: ReproduceResult,
            per_seed: list[dict[str, Rows]]) -> None:
    """The summary as a stage folder of its own and as an MLflow run beside the replicates."""
    payload = {
        "seeds": result.seeds,
        "runs": {str(k): v for k, v in result.runs.items()},
        "seconds": {str(k): round(v, 1) for k, v in result.seconds.items()},
        "per_seed": [{variant: [r if isinstance(r, Mapping) else r.to_dict() for r in rows]
                      for variant, rows in seed.items()} for seed in per_seed],
        "aggregate": {variant: [{"task": t, "metric": m, "group": g, "mean": c.mean,
                                 "std": c.std, "n": c.n} for (t, m, g), c in sorted(cells.items())]
                      for variant, cells in result.aggregate.items()},
        "gates": [{"name": r.gate.name, "measure": r.gate.measure, "rule": r.gate.rule(),
                   "value": _num(r.value), "low": _num(r.low), "high": _num(r.high),
                   "passed": r.passed, "seeds_passing": passing} for r, passing in result.gates],
        "certified": result.certified,
        "paired": [{"metric": p.metric, "baseline": p.baseline, "per_seed": p.per_seed,
                    "t": [_num(p.t.estimate), _num(p.t.low), _num(p.t.high)],
                    "bootstrap": [p.bootstrap.estimate, p.bootstrap.low, p.bootstrap.high],
                    "wins": list(p.wins),
                    "mcnemar": None if p.mcnemar is None else
                    [[m.a_only, m.b_only, m.p_value] for m in p.mcnemar]}
                   for p in result.paired],
    }
    stage = run_dir.stage(STAGE)
    with stage.build(fingerprint(payload), config=cfg.model_dump(mode="json")) as work:
        (work.path / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
        (work.path / "reproduce.md").write_text(result.markdown, encoding="utf-8")
    tracker = ExpansionTracker(tracking_uri, cfg.tracking.experiment, cfg.run_name,
                               tags={**cfg.tracking.tags, "deltamoe.reproduce": "true"})
    with tracker.stage(STAGE) as logger:
        metrics = {}
        for variant, cells in result.aggregate.items():
            for (task, metric, group), cell in cells.items():
                base = f"reproduce/{variant}/{task}/{metric}/{group}"
                metrics[f"{base}/mean"] = cell.mean
                metrics[f"{base}/std"] = cell.std
        for row in result.paired:
            base = f"reproduce/paired/{row.baseline}/{row.metric}"
            metrics.update({f"{base}/diff": row.bootstrap.estimate,
                            f"{base}/low": row.bootstrap.low, f"{base}/high": row.bootstrap.high})
        metrics.update({f"reproduce/gate/{r.gate.name}": float(r.passed)
                        for r, _ in result.gates})
        logger.log_metrics(metrics, step=0)
        logger.log_dict(payload["aggregate"], "reproduce/aggregate.json")
        logger.client.log_text(logger.run_id, result.markdown, "reproduce/reproduce.md")
    tracker.finish()
