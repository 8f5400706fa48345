"""Mixing: how many training tokens each language gets, requested and realized.

Shares come from the config: new languages split ``1 − replay_ratio`` by ``ratios`` (evenly when
none are given), original languages split ``replay_ratio`` (evenly unless ``ratios`` names them);
``tokens_per_language`` pins absolute counts that the shares do not touch. With a
``token_budget`` the request is share × budget; without one the request is the largest total
whose shares every language can fill. Either way the realized amounts keep the requested
proportions: when a language has less than asked, all share languages are scaled down together
(the mix is the point; a budget shortfall is reported, not papered over by one language).

``mode: all`` drops the proportions instead: every available token trains (pinned languages
still capped at their pin), and the shares that gives are what the statistics report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from components.config import MixConfig
from components.data.errors import DataError

__all__ = ["MixPlan", "mix_shares", "plan_mix"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixPlan:
    """Per language: tokens requested and the training sequences that realize them."""

    requested: dict[str, int]
    sequences: dict[str, int]
    shares: dict[str, float]
    scaled_down: bool


def _weights(tags: Sequence[str], ratios: Mapping[str, float], group: str) -> dict[str, float]:
    named = [t for t in tags if t in ratios]
    if not named:
        return {t: 1.0 / len(tags) for t in tags}
    unnamed = [t for t in tags if t not in ratios]
    if unnamed:
        raise DataError(f"data.mix.ratios names some {group} languages but not "
                        f"{', '.join(unnamed)}; give every {group} language a ratio or none")
    total = sum(ratios[t] for t in tags)
    return {t: ratios[t] / total for t in tags}


def mix_shares(languages: Sequence[str], original: Sequence[str], mix: MixConfig) -> \
        dict[str, float]:
    """Share of the (non-pinned) training tokens per language; they sum to 1."""
    free = [t for t in languages if t not in mix.tokens_per_language]
    new = [t for t in free if t not in original]
    old = [t for t in free if t in original]
    if not free:
        return {}
    if not new:
        return _weights(old, mix.ratios, "original")
    shares = {t: w * (1.0 - mix.replay_ratio if old else 1.0)
              for t, w in _weights(new, mix.ratios, "new").items()}
    if old and mix.replay_ratio > 0:
        shares.update({t: w * mix.replay_ratio
                       for t, w in _weights(old, mix.ratios, "original").items()})
    return shares


def plan_mix(available: Mapping[str, int], languages: Sequence[str], original: Sequence[str],
             mix: MixConfig, seq_len: int) -> MixPlan:
    """Training sequences per language from the tokens available (whole sequences only)."""
    shares = mix_shares(languages, original, mix)
    if mix.mode == "all":
        take = {t: min(available.get(t, 0), mix.tokens_per_language.get(t, available.get(t, 0)))
                for t in languages}
        return MixPlan(requested=take, sequences={t: n // seq_len for t, n in take.items()},
                       shares=shares, scaled_down=False)
    pinned = {t: n for t, n in mix.tokens_per_language.items() if t in languages}
    requested: dict[str, int] = dict(pinned)
    positive = {t: s for t, s in shares.items() if s > 0}
    if mix.token_budget is not None:
        free_budget = max(0, mix.token_budget - sum(pinned.values()))
        total = float(free_budget)
    else:
        total = min((available.get(t, 0) / s for t, s in positive.items()), default=0.0)
    for tag, share in shares.items():
        requested[tag] = int(share * total)
    feasible = min((available.get(t, 0) / s for t, s in positive.items()), default=0.0)
    scaled_down = total > feasible + 1e-9
    if scaled_down:
        log.warning("data.mix: the budget asks for %d tokens but the data fills the mix only "
                    "up to %d; every language is scaled down to keep the proportions",
                    int(total), int(feasible))
    realized_total = min(total, feasible)
    sequences = {}
    for tag in languages:
        if tag in pinned:
            tokens = min(pinned[tag], available.get(tag, 0))
        else:
            tokens = int(shares.get(tag, 0.0) * realized_total)
        sequences[tag] = tokens // seq_len
    return MixPlan(requested=requested, sequences=sequences, shares=shares,
                   scaled_down=scaled_down)
