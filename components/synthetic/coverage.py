"""How much of a corpus a base model's pre-training has seen: the world's coverage rule.

A new language's embeddings only move during pre-training if their ids occur there; an id the
base never saw stays at its random init (and frozen, in an MoE CPT that freezes shared weights).
The rule the world is built to (issue 20): at least 99 % of the CPT corpus's token occurrences
are of ids seen at least 10 times in the base's pre-training data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["id_counts", "seen_coverage"]


def id_counts(sequences: Iterable[Sequence[int]]) -> Counter[int]:
    """Occurrences of every token id over ``sequences`` (e.g. the base data's ``input_ids``)."""
    counts: Counter[int] = Counter()
    for ids in sequences:
        counts.update(ids)
    return counts


def seen_coverage(base: Counter[int] | Iterable[Sequence[int]],
                  target: Iterable[Sequence[int]], min_count: int = 10) -> float:
    """Share of ``target``'s token occurrences whose id occurs ≥ ``min_count`` times in
    ``base`` (id sequences or their :func:`id_counts`); 1.0 for an empty target."""
    counts = base if isinstance(base, Counter) else id_counts(base)
    total = seen = 0
    for ids in target:
        total += len(ids)
        seen += sum(1 for i in ids if counts[i] >= min_count)
    return seen / total if total else 1.0
