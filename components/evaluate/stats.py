"""Paired comparisons of two variants over seeds and items: intervals, sign counts, McNemar.

A comparison at toy scale has two sources of noise: the seed (each seed is a new world, base and
training run) and the items (a few hundred questions per language). Reading a difference needs
both, so every estimate here is *paired*: two variants are compared on the same seed and the
same items, never as two independent means.

Scores are stored per item as a numerator and a denominator so that one code path serves both
kinds of lm-eval metric: a mean of 0/1 scores (exact match, accuracy: denominator 1) and a ratio
of sums (bits per byte: bits over bytes, the way lm-eval aggregates it). A language group's score
is the mean over its languages of each language's score, the same average the results table
shows.

- :func:`t_interval`: the t-interval over per-seed differences (seeds as the only noise);
- :func:`paired_bootstrap`: a two-level bootstrap, seeds resampled, then items within each
  (seed, language), the same item indices for both variants;
- :func:`mcnemar_exact`: the exact McNemar test on one seed's items of a 0/1 metric;
- :func:`sign_count`: on how many seeds the difference has the expected sign.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Interval", "ItemScores", "McNemar", "group_value", "item_scores", "mcnemar_exact",
           "paired_bootstrap", "read_samples", "sign_count", "t_interval"]

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ItemScores:
    """One variant's per-item scores on one task in one language, keyed by lm-eval's doc_id."""

    doc_ids: np.ndarray  # int, sorted
    num: np.ndarray  # float
    den: np.ndarray  # float (1 for mean metrics)

    @property
    def value(self) -> float:
        return float(self.num.sum() / self.den.sum())

    def aligned(self, other: ItemScores) -> tuple[ItemScores, ItemScores]:
        """Both restricted to the items both have, in the same order (a pairing needs it)."""
        common = np.intersect1d(self.doc_ids, other.doc_ids)
        if common.size == 0:
            raise ValueError("the two variants share no items")
        return self._take(common), other._take(common)

    def _take(self, ids: np.ndarray) -> ItemScores:
        index = np.searchsorted(self.doc_ids, ids)
        return ItemScores(ids, self.num[index], self.den[index])


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval (``confidence``) and how many units it rests on."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.low):
            return f"{self.estimate:+.{digits}f}"
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


@dataclass(frozen=True)
class McNemar:
    """Discordant items of a 0/1 metric and the exact two-sided p-value."""

    a_only: int  # items variant a gets right and b wrong
    b_only: int
    p_value: float


def item_scores(samples: Sequence[Mapping[str, object]], metric: str) -> ItemScores:
    """Per-item scores of ``metric`` from lm-eval's logged samples of one task.

    lm-eval logs each sample's metric as it is fed to the aggregation: a number for mean
    metrics, a (log-likelihood, bytes) pair for ``bits_per_byte`` — turned here into bits over
    bytes so that the ratio of sums is lm-eval's own aggregate.
    """
    ids, num, den = [], [], []
    for sample in samples:
        if metric not in sample:
            raise KeyError(f"sample {sample.get('doc_id')} has no metric {metric!r} "
                           f"(it has {sorted(k for k in sample if k not in _SAMPLE_KEYS)})")
        value = sample[metric]
        ids.append(int(sample["doc_id"]))  # type: ignore[call-overload]
        if metric == "bits_per_byte":
            loglik, n_bytes = value  # type: ignore[misc]
            num.append(-float(loglik) / LN2)
            den.append(float(n_bytes))
        elif isinstance(value, list | tuple):
            raise ValueError(f"metric {metric!r} is not a per-item mean (got a pair); only "
                             "bits_per_byte is read as a ratio")
        else:
            num.append(float(value))  # type: ignore[arg-type]
            den.append(1.0)
    order = np.argsort(ids)
    return ItemScores(np.asarray(ids)[order], np.asarray(num)[order], np.asarray(den)[order])


_SAMPLE_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter",
                "metrics", "doc_hash", "prompt_hash", "target_hash"}


def read_samples(path: str | Path) -> list[dict[str, object]]:
    """lm-eval's samples file (JSON lines), as written by the evaluate stage."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def group_value(scores: Mapping[str, ItemScores]) -> float:
    """A language group's score: the mean over its languages of each language's score."""
    return float(np.mean([s.value for s in scores.values()]))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t interval of per-seed values; no interval from fewer than two."""
    from scipy import stats

    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if data.size < 2:
        return Interval(mean, float("nan"), float("nan"), int(data.size), confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, data.size - 1)
                 * data.std(ddof=1) / math.sqrt(data.size))
    return Interval(mean, mean - half, mean + half, int(data.size), confidence)


PairedSeed = Mapping[str, tuple[ItemScores, ItemScores]]  # language → (a, b), aligned


def paired_bootstrap(seeds: Sequence[PairedSeed], *, iters: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> Interval:
    """Two-level bootstrap of the group difference a − b, averaged over seeds.

    Each replicate draws seeds with replacement, then for every drawn seed and language draws
    that language's items with replacement, using the same item indices for a and b (the pairing),
    and takes the mean over drawn seeds of the group difference. The interval is the percentile
    interval of the replicates; the estimate is the difference on the data as they are.
    """
    if not seeds:
        raise ValueError("no seeds to compare")
    prepared = []
    for paired in seeds:
        langs = []
        for a, b in paired.values():
            a, b = a.aligned(b)
            langs.append((a.num, a.den, b.num, b.den))
        prepared.append(langs)

    def diff(langs: list[tuple[np.ndarray, ...]], picks: list[np.ndarray] | None) -> float:
        out = []
        for i, (an, ad, bn, bd) in enumerate(langs):
            if picks is not None:
                take = picks[i]
                an, ad, bn, bd = an[take], ad[take], bn[take], bd[take]
            out.append(an.sum() / ad.sum() - bn.sum() / bd.sum())
        return float(np.mean(out))

    estimate = float(np.mean([diff(langs, None) for langs in prepared]))
    rng = np.random.default_rng(seed)
    replicates = np.empty(iters)
    for r in range(iters):
        drawn = rng.integers(0, len(prepared), len(prepared))
        values = []
        for s in drawn:
            langs = prepared[s]
            picks = [rng.integers(0, lang[0].size, lang[0].size) for lang in langs]
            values.append(diff(langs, picks))
        replicates[r] = np.mean(values)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return Interval(estimate, float(low), float(high), len(prepared), confidence)


def mcnemar_exact(a: ItemScores, b: ItemScores) -> McNemar:
    """Exact McNemar test on the items both variants have, for a 0/1 metric.

    Under the null each discordant item is equally likely to favour either variant, so the count
    favouring a is Binomial(discordant, 1/2); the p-value is two-sided (scipy's binomtest).
    """
    from scipy import stats

    a, b = a.aligned(b)
    for scores, name in ((a, "a"), (b, "b")):
        if not np.isin(scores.num, (0.0, 1.0)).all() or not (scores.den == 1).all():
            raise ValueError(f"McNemar needs 0/1 item scores; variant {name} has others")
    a_only = int(((a.num == 1) & (b.num == 0)).sum())
    b_only = int(((a.num == 0) & (b.num == 1)).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    return McNemar(a_only, b_only, p)


def sign_count(differences: Sequence[float], higher_is_better: bool = True) -> tuple[int, int]:
    """(seeds whose difference favours a, seeds): a tie favours neither."""
    wins = sum(1 for d in differences if (d > 0 if higher_is_better else d < 0))
    return wins, len(differences)
