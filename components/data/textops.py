"""Whole-column text kernels that several per-document steps share.

The quality filters and the dedup normalisation both need the text with its whitespace runs
collapsed; that regex pass touches every byte of the corpus, so the document operator makes it
once per batch and hands the result to both.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["collapse_whitespace", "has_newline", "value_slices"]

# Matches only where collapsing changes something: a run of two or more whitespace characters,
# or one that is not a space. A lone space (almost every gap in prose) is no match, so RE2 does
# one replacement per line break instead of one per word: about 6x faster than ``\s+`` on text,
# same output. RE2's ``\s`` is ``[\t\n\f\r ]``, so ``[\t\n\f\r]`` is ``\s`` without the space.
_NEEDS_COLLAPSE = r"\s\s+|[\t\n\f\r]"


def collapse_whitespace(texts: pa.Array) -> pa.Array:
    """Every run of whitespace (RE2's ``\\s``: tab, newline, form feed, carriage return, space)
    replaced by one space; nothing else changes."""
    return pc.replace_substring_regex(texts, _NEEDS_COLLAPSE, " ")


def _layout(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bytes) of a string or binary array, as numpy views (no copy); a null counts as
    empty."""
    kind = np.int64 if pa.types.is_large_string(texts.type) or \
        pa.types.is_large_binary(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=kind, count=len(texts) + 1,
                            offset=texts.offset * np.dtype(kind).itemsize)
    data = texts.buffers()[2]
    return offsets, np.frombuffer(data, dtype=np.uint8) if data is not None \
        else np.zeros(0, np.uint8)


def value_slices(texts: pa.Array) -> Iterator[memoryview]:
    """Each value's UTF-8 bytes as a memoryview into the array's buffer (no Python bytes
    objects are made)."""
    offsets, data = _layout(texts)
    view = memoryview(data)
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        yield view[start:end]


def has_newline(texts: pa.Array) -> np.ndarray:
    """Whether each text holds a line feed, from one vectorised pass over the bytes (about four
    times faster than Arrow's substring search on text)."""
    offsets, data = _layout(texts)
    first, last = int(offsets[0]), int(offsets[-1])
    at = np.flatnonzero(data[first:last] == 10) + first
    out = np.zeros(len(texts), dtype=bool)
    out[np.searchsorted(offsets, at, side="right") - 1] = True
    return out
