"""Figures of a run's evaluation, written as PNG files (matplotlib's Agg backend, no display).

Per task metric: the score of every variant in every language, and the two averages the paper
reports separately (original languages, expanded languages). For MoE variants: a heatmap of
expert load per layer and language, and one of the routing drift between two variants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from components.evaluate.results import ResultRow, higher_is_better, language_averages

__all__ = ["plot_drift", "plot_group_averages", "plot_language_scores", "plot_routing"]


def _bars(ax: plt.Axes, groups: Sequence[str], series: Mapping[str, Sequence[float | None]]
          ) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.legend(fontsize=7, ncols=2)


def plot_language_scores(evaluated: Mapping[str, Sequence[ResultRow]], task: str, metric: str,
                         languages: Sequence[str], path: Path) -> Path:
    """Bars: languages on x, one bar per variant."""
    values = {v: {r.lang: r.value for r in rows if r.task == task and r.metric == metric}
              for v, rows in evaluated.items()}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(languages) * max(1, len(values)) / 3), 4))
    _bars(ax, list(languages), {v: [by.get(lang) for lang in languages]
                                for v, by in values.items()})
    arrow = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_title(f"{task}: {metric} per language ({arrow})")
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_group_averages(evaluated: Mapping[str, Sequence[ResultRow]], task: str, metric: str,
                        original: Sequence[str], new: Sequence[str], path: Path) -> Path:
    """Bars: variants on x, original-language and expanded-language averages side by side."""
    variants = list(evaluated)
    avgs = {v: language_averages(rows, original, new).get((task, metric), {})
            for v, rows in evaluated.items()}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(variants)), 4))
    _bars(ax, variants, {"original languages": [avgs[v].get("original") for v in variants],
                         "expanded languages": [avgs[v].get("new") for v in variants]})
    ax.set_title(f"{task}: {metric}, original vs expanded languages")
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heatmap(matrix: list[list[float]], rows: Sequence[str], cols: Sequence[str], title: str,
             path: Path, vmax: float = 1.0) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.3 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, line in enumerate(matrix):
        for j, value in enumerate(line):
            if value != value:  # NaN: no such expert in this layer
                continue
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.6 * vmax else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_routing(load: Mapping[int, Mapping[str, Sequence[float]]], title: str,
                 path: Path) -> Path:
    """Heatmap: a row per (layer, language), a column per expert, the share of assignments."""
    rows, matrix = [], []
    for layer, by_lang in sorted(load.items()):
        for lang, shares in by_lang.items():
            rows.append(f"L{layer} {lang}")
            matrix.append(list(shares))
    experts = max((len(m) for m in matrix), default=0)
    # LayerMoE gives layers different expert counts: the missing experts are blank cells
    matrix = [m + [float("nan")] * (experts - len(m)) for m in matrix]
    return _heatmap(matrix, rows, [f"e{e}" for e in range(experts)], title, path)


def plot_drift(drift: Mapping[int, Mapping[str, float]], title: str, path: Path) -> Path:
    """Heatmap: layers × languages, total-variation distance of the load."""
    langs = sorted({lang for by in drift.values() for lang in by})
    layers = sorted(drift)
    matrix = [[drift[layer].get(lang, 0.0) for lang in langs] for layer in layers]
    return _heatmap(matrix, [f"layer {layer}" for layer in layers], langs, title, path)
