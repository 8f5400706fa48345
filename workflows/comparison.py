"""The certified comparison of `deltamoe reproduce`: gates, per-item pairs, paired differences.

:mod:`workflows.reproduce` runs the seeds; this module reads what they left — each variant's
lm-eval samples under ``eval_parts/<variant>/lm_eval/`` — and turns the plan fixed before the
run (:mod:`components.evaluate.gates`) into the page's gates table, its paired-difference table
and its headline. Nothing here changes a number: it pairs them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.evaluate.gates import ComparisonPlan, GateResult, split_cell, split_metric
from components.evaluate.results import higher_is_better
from components.evaluate.stats import (
    Interval,
    ItemScores,
    McNemar,
    group_value,
    item_scores,
    mcnemar_exact,
    paired_bootstrap,
    read_samples,
    sign_count,
    t_interval,
)
from workflows.evaluate_stage import LMEVAL, PARTS

# (variant, task, metric) → lang → that variant's items in one seed
SeedItems = dict[tuple[str, str, str], dict[str, ItemScores]]
Cells = Mapping[tuple[str, str, str, str], float]

def samples_file(run_local: Path, variant: str, task: str, lang: str) -> Path | None:
    """lm-eval's samples of ``task`` in ``lang`` for ``variant``, whichever call wrote them."""
    folder = run_local / PARTS / variant / LMEVAL
    found = sorted(folder.glob(f"samples_*/{task}_{lang}.jsonl"))
    return found[0] if found else None


def collect_items(run_local: Path, variants: Sequence[str], metrics: Sequence[str],
                  languages: Mapping[str, Sequence[str]]) -> SeedItems:
    """Per-item scores of each (variant, task/metric) in every language of the metric's group
    that has samples; a language without a samples file (a task the language does not have)
    is left out, not filled."""
    out: SeedItems = {}
    for variant in variants:
        for ref in metrics:
            task, metric, group = split_metric(ref)
            for lang in languages[group]:
                path = samples_file(run_local, variant, task, lang)
                if path is not None:
                    out.setdefault((variant, task, metric), {})[lang] = item_scores(
                        read_samples(path), metric)
    return out


@dataclass(frozen=True)
class PairedRow:
    """``variant − baseline`` on one metric of one language group, over seeds."""

    metric: str  # task/metric/group
    baseline: str
    per_seed: list[float]
    t: Interval
    bootstrap: Interval
    wins: tuple[int, int]
    mcnemar: list[McNemar] | None  # per seed, for 0/1 metrics

    def favours_variant(self) -> bool | None:
        """True/False when the bootstrap interval excludes zero, None when it does not."""
        if not self.bootstrap.excludes_zero():
            return None
        better = self.bootstrap.low > 0 if higher_is_better(split_metric(self.metric)[1]) else \
            self.bootstrap.high < 0
        return better


def _pooled(scores: Mapping[str, ItemScores]) -> ItemScores:
    """A group's items as one sample (for McNemar), ids made unique per language."""
    ids, num, den, offset = [], [], [], 0
    for lang in sorted(scores):
        s = scores[lang]
        ids.append(s.doc_ids + offset)
        num.append(s.num)
        den.append(s.den)
        offset += int(s.doc_ids.max()) + 1
    return ItemScores(np.concatenate(ids), np.concatenate(num), np.concatenate(den))


def paired_rows(seeds: Sequence[SeedItems], plan: ComparisonPlan,
                languages: Mapping[str, Sequence[str]]) -> list[PairedRow]:
    """The plan's variant against each of its baselines on each of its metrics."""
    rows = []
    for ref in plan.metrics:
        task, metric, group = split_metric(ref)
        for baseline in plan.baselines:
            pairs = []
            for items in seeds:
                a = items.get((plan.variant, task, metric), {})
                b = items.get((baseline, task, metric), {})
                langs = [lang for lang in languages[group] if lang in a and lang in b]
                if langs:
                    pairs.append({lang: a[lang].aligned(b[lang]) for lang in langs})
            if len(pairs) != len(seeds) or not pairs:
                continue  # a seed lacks the items: no paired row rather than a partial one
            per_seed = [group_value({k: v[0] for k, v in p.items()})
                        - group_value({k: v[1] for k, v in p.items()}) for p in pairs]
            boot = paired_bootstrap(pairs, iters=plan.bootstrap.iters, seed=plan.bootstrap.seed,
                                    confidence=plan.bootstrap.confidence)
            binary = all(np.isin(s.num, (0.0, 1.0)).all() and (s.den == 1).all()
                         for p in pairs for pair in p.values() for s in pair)
            mcnemar = [mcnemar_exact(_pooled({k: v[0] for k, v in p.items()}),
                                     _pooled({k: v[1] for k, v in p.items()}))
                       for p in pairs] if binary else None
            rows.append(PairedRow(ref, baseline, per_seed,
                                  t_interval(per_seed, plan.bootstrap.confidence), boot,
                                  sign_count(per_seed, higher_is_better(metric)), mcnemar))
    return rows


def gate_rows(plan: ComparisonPlan, mean_cells: Cells,
              seed_cells: Sequence[Cells]) -> list[tuple[GateResult, int]]:
    """Each gate on the seed means, with the number of seeds on which it passes alone."""
    return [(gate.check(mean_cells), sum(gate.check(c).passed for c in seed_cells))
            for gate in plan.gates]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def gates_table(results: Sequence[tuple[GateResult, int]], seeds: int) -> str:
    lines = ["| gate | why | measured (mean over seeds) | rule | bound | seeds passing | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for result, passing in results:
        gate = result.gate
        bound = " – ".join(_fmt(b) for b in (result.low, result.high) if b is not None)
        lines.append(f"| {gate.name} | {gate.why} | `{gate.measure}` = {_fmt(result.value)} | "
                     f"{gate.rule()} | {bound} | {passing}/{seeds} | "
                     f"{'pass' if result.passed else '**FAIL**'} |")
    return "\n".join(lines)


def paired_table(rows: Sequence[PairedRow], variant: str) -> str:
    lines = [f"| metric (group) | {variant} − baseline | per seed | mean, 95 % t-interval | "
             "95 % bootstrap (seeds × items) | seeds favouring | McNemar p per seed "
             f"({variant}-only / baseline-only items) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = ", ".join(f"{d:+.3f}" for d in row.per_seed)
        mc = "—" if row.mcnemar is None else "; ".join(
            f"{m.p_value:.3g} ({m.a_only}/{m.b_only})" for m in row.mcnemar)
        lines.append(f"| {row.metric} | {row.baseline} | {seeds} | {row.t.text()} | "
                     f"{row.bootstrap.text()} | {row.wins[0]}/{row.wins[1]} {variant} | {mc} |")
    return "\n".join(lines)


def headline_row(rows: Sequence[PairedRow], plan: ComparisonPlan) -> PairedRow | None:
    head = plan.headline
    return next((r for r in rows if r.metric == head.metric and r.baseline == head.against),
                None)


def headline_text(row: PairedRow | None, plan: ComparisonPlan, certified: bool) -> str:
    head = plan.headline
    if row is None:
        return (f"Headline: {head.variant} − {head.against} on {head.metric}: no paired items "
                "(a variant or a seed is missing).")
    task, metric, group = split_metric(head.metric)
    text = (f"Headline ({task} {metric}, {group} languages): {head.variant} − {head.against} = "
            f"{row.bootstrap.estimate:+.3f}, 95 % interval {row.bootstrap.text()} (bootstrap "
            f"over seeds and items), t-interval over seeds {row.t.text()}; "
            f"{row.wins[0]} of {row.wins[1]} seeds favour {head.variant}.")
    if not certified:
        text += (" **Not read: a gate failed, so the world does not certify this comparison.**")
    return text


def seed_cells(per_variant: Mapping[str, Mapping[tuple[str, str, str], float]]) -> Cells:
    """(variant, task, metric, group) → value, from reproduce's per-variant language averages."""
    return {(variant, task, metric, group): value
            for variant, cells in per_variant.items()
            for (task, metric, group), value in cells.items()}


def mean_over_seeds(seeds: Sequence[Cells]) -> Cells:
    keys = set().union(*(s.keys() for s in seeds)) if seeds else set()
    return {k: statistics.fmean(s[k] for s in seeds if k in s) for k in keys}


def needed_variants(plan: ComparisonPlan) -> list[str]:
    """Every variant the plan's pairs and gates read."""
    names = [plan.variant, *plan.baselines, plan.headline.variant, plan.headline.against]
    for gate in plan.gates:
        names.append(split_cell(gate.measure)[0])
    return list(dict.fromkeys(names))
