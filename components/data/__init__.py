"""The data stage: read web corpora, tag languages, filter, dedup, tokenize, pack and mix.

Ray Data workers do the per-document work (reading with column projection, language ID,
quality filters, hashes, tokenization) on an actor pool; dedup is shuffles reduced by Ray tasks
(exact hashes, MinHash LSH buckets, duplicate clusters); each language packs in its own task and
writes its shards. The driver plans and sees counts only (:mod:`components.data.pipeline`).

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
