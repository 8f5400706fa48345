"""Paired statistics of the reproduction: intervals, the two-level bootstrap, exact McNemar."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.evaluate.stats import (
    ItemScores,
    group_value,
    item_scores,
    mcnemar_exact,
    paired_bootstrap,
    sign_count,
    t_interval,
)


def _scores(values: list[float], ids: list[int] | None = None) -> ItemScores:
    ids = ids if ids is not None else list(range(len(values)))
    return item_scores([{"doc_id": i, "exact_match": v} for i, v in zip(ids, values,
                                                                          strict=True)],
                       "exact_match")


def test_t_interval_matches_the_textbook_formula() -> None:
    got = t_interval([0.1, 0.2, 0.3])
    # mean 0.2, sd 0.1, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert got.estimate == pytest.approx(0.2)
    assert (got.low, got.high) == pytest.approx((0.2 - half, 0.2 + half), rel=1e-6)
    assert got.n == 3 and not got.excludes_zero()
    one = t_interval([0.4])
    assert one.estimate == 0.4 and math.isnan(one.low)


def test_bits_per_byte_items_are_a_ratio_of_sums() -> None:
    samples = [{"doc_id": 1, "bits_per_byte": [-math.log(2) * 30, 10]},
               {"doc_id": 0, "bits_per_byte": [-math.log(2) * 10, 30]}]
    scores = item_scores(samples, "bits_per_byte")
    assert scores.doc_ids.tolist() == [0, 1]
    assert scores.value == pytest.approx(40 / 40)  # (10 + 30 bits) / (30 + 10 bytes)
    with pytest.raises(KeyError, match="no metric 'acc'"):
        item_scores(samples, "acc")


def test_bootstrap_of_identical_variants_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(3):
        a = _scores(rng.integers(0, 2, 200).astype(float).tolist())
        seeds.append({"swh_Latn": (a, a), "rus_Cyrl": (a, a)})
    got = paired_bootstrap(seeds, iters=200)
    assert (got.estimate, got.low, got.high) == (0.0, 0.0, 0.0)


def test_bootstrap_pairs_items_and_covers_a_known_shift() -> None:
    rng = np.random.default_rng(1)
    seeds = []
    for _ in range(4):
        b = rng.integers(0, 2, 300).astype(float)
        a = b.copy()
        flip = rng.choice(np.flatnonzero(a == 0), 30, replace=False)
        a[flip] = 1.0  # a gets 30 more items right than b, never fewer
        seeds.append({"swh_Latn": (_scores(a.tolist()), _scores(b.tolist()))})
    got = paired_bootstrap(seeds, iters=500)
    assert got.estimate == pytest.approx(0.1)
    # paired: every replicate difference is positive, so the interval excludes zero and stays
    # close to the shift; unpaired resampling of two 0/1 columns would span far wider
    assert 0.07 < got.low < 0.1 < got.high < 0.13
    assert got.excludes_zero()


def test_group_value_averages_languages_not_items() -> None:
    scores = {"swh_Latn": _scores([1.0, 1.0]), "rus_Cyrl": _scores([0.0] * 8)}
    assert group_value(scores) == pytest.approx(0.5)


def test_alignment_keeps_only_shared_items() -> None:
    a = _scores([1.0, 0.0, 1.0], ids=[0, 1, 2])
    b = _scores([0.0, 1.0], ids=[2, 5])
    left, right = a.aligned(b)
    assert left.doc_ids.tolist() == right.doc_ids.tolist() == [2]
    assert (left.num.tolist(), right.num.tolist()) == ([1.0], [0.0])


def test_mcnemar_exact_on_hand_made_items() -> None:
    # 8 items only a gets right, 1 only b, 5 both, 6 neither: p = 2·P(X ≤ 1 | n=9, ½) = 20/512
    a = [1.0] * 8 + [0.0] + [1.0] * 5 + [0.0] * 6
    b = [0.0] * 8 + [1.0] + [1.0] * 5 + [0.0] * 6
    got = mcnemar_exact(_scores(a), _scores(b))
    assert (got.a_only, got.b_only) == (8, 1)
    assert got.p_value == pytest.approx(20 / 512)
    assert mcnemar_exact(_scores(a), _scores(a)).p_value == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact(_scores([0.5, 1.0]), _scores([1.0, 1.0]))


def test_sign_count_respects_direction() -> None:
    assert sign_count([0.1, -0.2, 0.0, 0.3]) == (2, 4)
    assert sign_count([-0.1, -0.2, 0.1], higher_is_better=False) == (2, 3)
