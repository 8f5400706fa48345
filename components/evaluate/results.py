"""Result rows, the contract every variant's evaluation is written in, and their summaries.

One row per (task, language, metric): ``{task, lang, metric, value, stderr, n}``. Rows come from
lm-eval's results dict (its keys are ``"<metric>,<filter>"``) through :func:`rows_from_lmeval`,
are written one JSON per variant, and reduce to the two averages the paper reports separately:
over the original languages and over the expanded ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LOWER_IS_BETTER",
    "PRIMARY_METRIC",
    "ResultRow",
    "comparison_rows",
    "comparison_table",
    "higher_is_better",
    "language_averages",
    "merge_rows",
    "read_results",
    "rows_from_lmeval",
    "write_results",
]

# The one metric per task that the comparison table and the plots show.
PRIMARY_METRIC = {
    "synthetic_lm": "bits_per_byte", "synthetic_openbook": "exact_match",
    "synthetic_closed_original": "exact_match", "synthetic_closed_new": "exact_match",
    "synthetic_mc": "acc",
    "perplexity": "bits_per_byte", "flores": "chrf", "mgsm": "exact_match",
}
LOWER_IS_BETTER = frozenset({"bits_per_byte", "word_perplexity", "byte_perplexity", "perplexity",
                             "ter"})
_DEFAULT_PRIMARY = "acc"


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of lm-eval metric ``metric`` is better (the one rule every table,
    arrow and paired comparison reads)."""
    return metric not in LOWER_IS_BETTER


@dataclass(frozen=True)
class ResultRow:
    """One number: ``value`` of ``metric`` on ``task`` in language ``lang`` over ``n`` items."""

    task: str
    lang: str
    metric: str
    value: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rows_from_lmeval(results: Mapping[str, Any], tasks: Mapping[str, tuple[str, str]]
                     ) -> list[ResultRow]:
    """Rows from ``simple_evaluate``'s output; ``tasks`` maps lm-eval task name → (task, lang).

    Every numeric metric of every filter is kept (``exact_match,strip`` → ``exact_match`` for the
    task's single filter; a second filter is kept as ``<metric>:<filter>``); stderr "N/A" → None.
    """
    rows = []
    per_task = results.get("results", {})
    samples = results.get("n-samples", {})
    for name, (task, lang) in tasks.items():
        if name not in per_task:
            raise KeyError(f"lm-eval returned no result for task {name!r}")
        metrics = per_task[name]
        n = int(samples.get(name, {}).get("effective", 0))
        filters = sorted({k.split(",", 1)[1] for k in metrics if "," in k and
                          not k.split(",", 1)[0].endswith("_stderr")})
        for key, raw in sorted(metrics.items()):
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            value = _number(raw)
            if metric.endswith("_stderr") or value is None:
                continue
            stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
            label = metric if len(filters) <= 1 or filt == filters[0] else f"{metric}:{filt}"
            rows.append(ResultRow(task, lang, label, value, stderr, n))
    return rows


def write_results(path: Path, variant: str, rows: Sequence[ResultRow],
                  meta: Mapping[str, Any] | None = None) -> None:
    """One JSON per variant: ``{"variant", "meta", "rows": [...]}``."""
    payload = {"variant": variant, "meta": dict(meta or {}), "rows": [r.to_dict() for r in rows]}
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_results(path: Path) -> list[ResultRow]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [ResultRow(**row) for row in data["rows"]]


def primary_metric(task: str) -> str:
    return PRIMARY_METRIC.get(task, _DEFAULT_PRIMARY)


def language_averages(rows: Iterable[ResultRow], original: Sequence[str], new: Sequence[str]
                      ) -> dict[tuple[str, str], dict[str, float | None]]:
    """(task, metric) → {"original": mean over original languages, "new": over new ones}.

    A group with no language measured is None, not 0: a missing number must not look like a score.
    """
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        group = "original" if row.lang in original else "new" if row.lang in new else None
        if group is None:
            continue
        table.setdefault((row.task, row.metric), {"original": [], "new": []})[group].append(
            row.value)
    return {key: {g: (sum(v) / len(v) if v else None) for g, v in groups.items()}
            for key, groups in table.items()}


def comparison_rows(evaluated: Mapping[str, Sequence[ResultRow]], original: Sequence[str],
                    new: Sequence[str], primary_only: bool = True) -> list[dict[str, Any]]:
    """Variants × (task, metric) × {original avg, expanded avg}, as flat rows."""
    out = []
    for variant, rows in evaluated.items():
        for (task, metric), avg in sorted(language_averages(rows, original, new).items()):
            if primary_only and metric != primary_metric(task):
                continue
            out.append({"variant": variant, "task": task, "metric": metric,
                        "original": avg["original"], "new": avg["new"]})
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def comparison_table(evaluated: Mapping[str, Sequence[ResultRow]], original: Sequence[str],
                     new: Sequence[str]) -> str:
    """Markdown: one row per variant, an original and an expanded column per task's metric."""
    flat = comparison_rows(evaluated, original, new)
    columns = sorted({(r["task"], r["metric"]) for r in flat})
    if not columns:
        return "(no evaluation results)"
    cells = {(r["variant"], r["task"], r["metric"]): r for r in flat}
    header = ["variant"]
    for task, metric in columns:
        arrow = "↑" if higher_is_better(metric) else "↓"
        header += [f"{task} {metric}{arrow} orig", f"{task} {metric}{arrow} new"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in evaluated:
        line = [variant]
        for task, metric in columns:
            cell = cells.get((variant, task, metric), {})
            line += [_fmt(cell.get("original")), _fmt(cell.get("new"))]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def merge_rows(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """One row per (task, lang, metric): rows of a group's leaf tasks (Global-MMLU's subjects)
    become their size-weighted mean, with the stderr of that mean."""
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.task, row.lang, row.metric), []).append(row)
    out = []
    for (task, lang, metric), members in groups.items():
        if len(members) == 1:
            out.append(members[0])
            continue
        total = sum(r.n for r in members)
        weights = [r.n / total if total else 1 / len(members) for r in members]
        value = sum(w * r.value for w, r in zip(weights, members, strict=True))
        stderr = None
        if all(r.stderr is not None for r in members):
            stderr = math.sqrt(sum((w * (r.stderr or 0.0)) ** 2
                                   for w, r in zip(weights, members, strict=True)))
        out.append(ResultRow(task, lang, metric, value, stderr, total))
    return out
