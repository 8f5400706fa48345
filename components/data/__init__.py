"""The data stage: read web corpora, tag languages, filter, dedup, tokenize, pack and mix.

Ray Data does the per-document work (reading with column projection, language ID on an actor
pool, quality filters, tokenization); the driver keeps what needs one global view (exact and
near-duplicate removal in corpus order, per-language packing, the mix) and writes the shards.

The pipeline (and Ray Data with it) loads on first use of :func:`prepare_data`, so the readers'
registry stays cheap to import for the run config's validation.
"""

from __future__ import annotations

from typing import Any

from components.data.errors import DataError

__all__ = ["DataError", "DataResult", "prepare_data"]


def __getattr__(name: str) -> Any:
    if name in ("DataResult", "prepare_data"):
        from components.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
