"""Whole-column text kernels that several per-document steps share.

The quality filters and the dedup normalisation both need the text with its whitespace runs
collapsed; that regex pass touches every byte of the corpus, so the document operator makes it
once per batch and hands the result to both.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["collapse_whitespace"]


def collapse_whitespace(texts: pa.Array) -> pa.Array:
    """Every run of whitespace (RE2's ``\\s``: tab, newline, form feed, carriage return, space)
    replaced by one space; nothing else changes."""
    return pc.replace_substring_regex(texts, r"\s+", " ")
