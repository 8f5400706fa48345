"""Document quality filters with per-language thresholds, vectorised over Arrow batches.

Three cheap signals catch most web boilerplate: length (too short to teach anything, or a dump),
the share of repeated lines (menus, cookie banners, spam), and the share of characters that are
not letters (digit soup, tables, code). Scripts differ: Thai or Devanagari vowel signs are marks,
not letters, and Chinese has no spaces, so thresholds are per language. Letters are counted
with RE2's ``\\p{L}\\p{M}`` inside Arrow, not a Python loop over characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config import FiltersConfig, FilterThresholds
from components.data.textops import collapse_whitespace, has_newline

__all__ = ["FILTER_NAMES", "QualityFilter", "Thresholds", "duplicate_line_fraction",
           "thresholds_for"]

FILTER_NAMES = ("min_chars", "max_chars", "duplicate_lines", "non_alpha")


@dataclass(frozen=True)
class Thresholds:
    """The resolved thresholds of one language (``None``: that filter is off)."""

    min_chars: int | None
    max_chars: int | None
    max_duplicate_line_fraction: float | None
    max_non_alpha_fraction: float | None


def thresholds_for(filters: FiltersConfig, lang: str) -> Thresholds:
    """The global thresholds with the keys the language's override actually sets."""
    override: FilterThresholds | None = filters.per_language.get(lang)
    values = {}
    for name in FilterThresholds.model_fields:
        chosen = override if override is not None and name in override.model_fields_set \
            else filters
        values[name] = getattr(chosen, name)
    return Thresholds(**values)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (0 for one-line documents)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


class QualityFilter:
    """Marks ``drop`` with the first failing filter (in :data:`FILTER_NAMES` order)."""

    def __init__(self, filters: FiltersConfig, languages: Sequence[str]) -> None:
        self.default = thresholds_for(filters, "")
        self.per_language = {tag: thresholds_for(filters, tag) for tag in languages}
        every = [self.default, *self.per_language.values()]
        #: thresholds some language sets: a signal no language reads is not computed
        self.on = {name for name in FilterThresholds.model_fields
                   if any(getattr(t, name) is not None for t in every)}

    @property
    def reads_collapsed(self) -> bool:
        """Whether :meth:`reasons` reads the whitespace-collapsed text (the non-letter share)."""
        return "max_non_alpha_fraction" in self.on

    def _column(self, langs: list[str], name: str) -> np.ndarray:
        """Per-row threshold (NaN where the filter is off for the row's language)."""
        values = {}
        for tag in set(langs):
            value = getattr(self.per_language.get(tag, self.default), name)
            values[tag] = np.nan if value is None else float(value)
        return np.array([values[t] for t in langs], dtype=np.float64)

    def reasons(self, texts: pa.Array, langs: list[str],
                collapsed: pa.Array | None = None) -> list[str]:
        """The failing filter per document, ``""`` where all pass.

        ``collapsed`` is :func:`collapse_whitespace` of ``texts`` when the caller has it (the
        exact-dedup hash needs it too): the regex pass over every byte is the costly part.
        """
        n = len(texts)
        chars = pc.utf8_length(pc.utf8_trim_whitespace(texts)).to_numpy(zero_copy_only=False)
        non_alpha = np.zeros(n)
        if self.reads_collapsed:
            if collapsed is None:
                collapsed = collapse_whitespace(texts)
            # Every whitespace run is one space in `collapsed`: characters minus spaces are the
            # non-space characters. Non-letters are counted as single-character matches of the
            # complement class (whitespace is in the class, so collapsing changes nothing).
            nonspace = (pc.utf8_length(collapsed).to_numpy(zero_copy_only=False)
                        - pc.count_substring(collapsed, " ").to_numpy(zero_copy_only=False))
            other = pc.count_substring_regex(collapsed, r"[^\p{L}\p{M}\s]").to_numpy(
                zero_copy_only=False)
            non_alpha = np.where(nonspace > 0, other / np.maximum(nonspace, 1), 1.0)
        dup = np.zeros(n)
        if "max_duplicate_line_fraction" in self.on:
            multiline = has_newline(texts)
            if multiline.any():
                py = texts.to_pylist()
                for i in np.flatnonzero(multiline):
                    dup[i] = duplicate_line_fraction(py[i])
        checks = (
            ("min_chars", chars < self._column(langs, "min_chars")),
            ("max_chars", chars > self._column(langs, "max_chars")),
            ("duplicate_lines", dup > self._column(langs, "max_duplicate_line_fraction")),
            ("non_alpha", non_alpha > self._column(langs, "max_non_alpha_fraction")),
        )
        out = [""] * n
        for name, failed in reversed(checks):  # the first filter in order wins
            for i in np.flatnonzero(failed):  # NaN thresholds compare False: filter off
                out[i] = name
        return out
