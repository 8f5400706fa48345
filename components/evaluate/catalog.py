"""The registry of evaluation suites: the one list the config, the CLI and the README read.

A suite is ``synthetic`` (the world's offline suite), one lm-eval benchmark per language (each
benchmark :mod:`components.languages` knows task names for), ``flores`` (translation from a
pivot) or ``perplexity`` (held-out text). This module imports nothing heavy; the task configs
are built by :mod:`components.evaluate.suites`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

from components.languages import benchmark_names

__all__ = ["Suite", "benchmarks", "suites"]


@dataclass(frozen=True)
class Suite:
    name: str
    kind: Literal["synthetic", "benchmark", "flores", "perplexity"]
    help: str


@cache
def suites() -> dict[str, Suite]:
    """Every suite by name, in the order tables list them."""
    entries = [Suite("synthetic", "synthetic", "the synthetic world's instruction, multiple "
                     "choice and held-out text tasks")]
    entries += [Suite(name, "benchmark", f"lm-eval's {name} in each language that has it")
                for name in benchmark_names()]
    entries += [Suite("flores", "flores", "FLORES-200 translation into and out of each language "
                      "from the first original language (chrF, BLEU)"),
                Suite("perplexity", "perplexity", "bits per byte on held-out text per language")]
    return {s.name: s for s in entries}


def benchmarks() -> tuple[str, ...]:
    """The lm-eval benchmark suites."""
    return tuple(name for name, s in suites().items() if s.kind == "benchmark")
