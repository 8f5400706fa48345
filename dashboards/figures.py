"""The report's figures: scores with 95 % error bars (a log axis when they span a decade or
more, as perplexities do), original/expanded averages, and router load heat maps with the
experts allocated to each language outlined, so a reader sees at once whether the router sends
a language where the allocation meant it to go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from components.evaluate.results import LOWER_IS_BETTER, ResultRow
from dashboards.summary import Z95, group_mean

__all__ = ["allocated_experts", "plot_averages", "plot_routing_allocated", "plot_scores",
           "spans_decades"]


def spans_decades(values: Sequence[float | None]) -> bool:
    """Positive values whose largest is ≥ 10× the smallest: a linear axis would hide the small."""
    known = [v for v in values if v is not None]
    return bool(known) and min(known) > 0 and max(known) >= 10 * min(known)


def _bars(ax: plt.Axes, groups: Sequence[str],
          series: Mapping[str, Sequence[tuple[float | None, float | None]]]) -> list[float]:
    width = 0.8 / max(1, len(series))
    values: list[float] = []
    for i, (label, cells) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else float("nan") for v, _ in cells]
        errors = [Z95 * s if s is not None else 0.0 for _, s in cells]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=label)
        values += [v for v, _ in cells if v is not None]
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.legend(fontsize=7, ncols=2)
    return values


def _finish(fig: plt.Figure, ax: plt.Axes, values: Sequence[float], metric: str, title: str,
            path: Path) -> Path:
    if spans_decades(values):
        ax.set_yscale("log")
        title += ", log scale"
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(metric + (" (log)" if ax.get_yscale() == "log" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scores(results: Mapping[str, Sequence[ResultRow]], task: str, metric: str,
                languages: Sequence[str], path: Path) -> Path:
    """Bars per language, one per variant, with 95 % error bars."""
    cells = {v: {r.lang: (r.value, r.stderr) for r in rows if (r.task, r.metric) == (task, metric)}
             for v, rows in results.items()}
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(languages) * max(1, len(cells))), 4))
    values = _bars(ax, list(languages), {v: [by.get(lang, (None, None)) for lang in languages]
                                         for v, by in cells.items()})
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    return _finish(fig, ax, values, metric, f"{task}: {metric} ({arrow}, 95 % intervals)", path)


def plot_averages(results: Mapping[str, Sequence[ResultRow]], task: str, metric: str,
                  original: Sequence[str], new: Sequence[str], path: Path) -> Path:
    """Bars per variant: the original-language and the expanded-language means."""
    variants = list(results)
    series: dict[str, list[tuple[float | None, float | None]]] = {}
    for label, langs in (("original languages", original), ("expanded languages", new)):
        series[label] = [group_mean([r for r in results[v] if (r.task, r.metric) ==
                                     (task, metric) and r.lang in langs])[:2] for v in variants]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(variants)), 4))
    values = _bars(ax, variants, series)
    return _finish(fig, ax, values, metric, f"{task}: {metric}, original vs expanded languages",
                   path)


def allocated_experts(allocation: Mapping[str, Sequence[int]],
                      groups: Mapping[str, Sequence[str]], lang: str) -> set[int]:
    """The experts the allocation gives ``lang``: its own entry and its groups' entries."""
    out = set(allocation.get(lang, ()))
    for group, members in groups.items():
        if lang in members:
            out |= set(allocation.get(group, ()))
    return out


def plot_routing_allocated(load: Mapping[int, Mapping[str, Sequence[float]]], title: str,
                           path: Path, allocation: Mapping[str, Sequence[int]] | None = None,
                           groups: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Heat map: a row per (layer, language), a column per expert, the share of its tokens'
    assignments; the experts allocated to the row's language outlined in red."""
    rows, matrix, marks = [], [], []
    for layer, by_lang in sorted(load.items()):
        for lang, shares in by_lang.items():
            rows.append(f"L{layer} {lang}")
            matrix.append(list(shares))
            marks.append(allocated_experts(allocation or {}, groups or {}, lang))
    experts = max((len(m) for m in matrix), default=0)
    matrix = [m + [float("nan")] * (experts - len(m)) for m in matrix]
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * experts, 1.2 + 0.3 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(experts), [f"e{e}" for e in range(experts)])
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, line in enumerate(matrix):
        for j, value in enumerate(line):
            if value == value:  # NaN: no such expert in this layer (LayerMoE)
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
            if j in marks[i]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                                       linewidth=1.5))
    fig.colorbar(image, ax=ax)
    ax.set_title(title + ("\n(red: allocated experts)" if any(marks) else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
