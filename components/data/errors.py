"""The one error type of the data stage: input a user can fix (a path, a column, a language)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data input: names what is wrong and where (source, path, column or language)."""
