"""Whole-column text kernels that several per-document steps share.

The quality filters and the dedup normalisation both need the text with its whitespace runs
collapsed; that regex pass touches every byte of the corpus, so the document operator makes it
once per batch and hands the result to both.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["collapse_whitespace"]

# Matches only where collapsing changes something: a run of two or more whitespace characters,
# or one that is not a space. A lone space (almost every gap in prose) is no match, so RE2 does
# one replacement per line break instead of one per word: about 6x faster than ``\s+`` on text,
# same output. RE2's ``\s`` is ``[\t\n\f\r ]``, so ``[\t\n\f\r]`` is ``\s`` without the space.
_NEEDS_COLLAPSE = r"\s\s+|[\t\n\f\r]"


def collapse_whitespace(texts: pa.Array) -> pa.Array:
    """Every run of whitespace (RE2's ``\\s``: tab, newline, form feed, carriage return, space)
    replaced by one space; nothing else changes."""
    return pc.replace_substring_regex(texts, _NEEDS_COLLAPSE, " ")
