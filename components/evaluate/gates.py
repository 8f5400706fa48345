"""The comparison plan: gates that certify a toy world, and what the comparison then reads.

A comparison at toy scale means something only if the world it runs in behaves like the real
setting: the base knows the original languages, the post-trained model follows instructions in
them and not yet in the new ones, dense continued pre-training forgets, and so on. Those
conditions are written in a plan file *before* the comparison runs (``reproduce.gates.yaml``
beside the reproduce config); the results page lists every gate with its measured value, and a
failed gate means the world must change, never a method's settings.

The same file fixes what the comparison reports: the headline (one paired difference with its
interval), the metrics and baselines of the paired-difference table, and the chance level of
each metric. A cell is named ``variant/task/metric/group`` (``group`` is ``original`` or
``new``: the mean over that group's languages); a metric without the variant is
``task/metric/group``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from components.config.loading import ConfigError, parse_yaml

__all__ = ["CellRef", "ComparisonPlan", "Gate", "GateResult", "MetricRef", "load_plan"]

GROUPS = ("original", "new")


def _parts(text: str, count: int, what: str) -> tuple[str, ...]:
    parts = tuple(text.split("/"))
    if len(parts) != count or not all(parts):
        raise ValueError(f"{text!r} is not {what}")
    if parts[-1] not in GROUPS:
        raise ValueError(f"{text!r}: the group must be one of {', '.join(GROUPS)}")
    return parts


def _cell(text: str) -> str:
    _parts(text, 4, "variant/task/metric/group")
    return text


def _metric(text: str) -> str:
    _parts(text, 3, "task/metric/group")
    return text


CellRef = Annotated[str, AfterValidator(_cell)]
MetricRef = Annotated[str, AfterValidator(_metric)]
Cells = Mapping[tuple[str, str, str, str], float]  # (variant, task, metric, group) → value


def split_cell(ref: str) -> tuple[str, str, str, str]:
    variant, task, metric, group = ref.split("/")
    return variant, task, metric, group


def split_metric(ref: str) -> tuple[str, str, str]:
    task, metric, group = ref.split("/")
    return task, metric, group


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Relative(_Plan):
    """A bound that is a multiple of another cell: ``factor × of``."""

    factor: float = Field(gt=0)
    of: CellRef


Bound = float | Relative


class Gate(_Plan):
    """One condition on one cell, with the reason it must hold."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    why: str
    measure: CellRef
    min: Bound | None = None
    max: Bound | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Gate:
        if self.min is None and self.max is None:
            raise ValueError(f"gate {self.name}: give min, max or both")
        return self

    def rule(self) -> str:
        def side(bound: Bound) -> str:
            return f"{bound:g}" if isinstance(bound, float | int) else \
                f"{bound.factor:g} × {bound.of}"
        parts = []
        if self.min is not None:
            parts.append(f"≥ {side(self.min)}")
        if self.max is not None:
            parts.append(f"≤ {side(self.max)}")
        return " and ".join(parts)

    def check(self, cells: Cells) -> GateResult:
        """The gate on ``cells``; a cell that is missing fails it (a gate cannot pass unseen)."""
        value = cells.get(split_cell(self.measure), math.nan)

        def limit(bound: Bound | None) -> float | None:
            if bound is None:
                return None
            if isinstance(bound, float | int):
                return float(bound)
            return bound.factor * cells.get(split_cell(bound.of), math.nan)

        low, high = limit(self.min), limit(self.max)
        ok = not math.isnan(value)
        if low is not None:
            ok = ok and not math.isnan(low) and value >= low
        if high is not None:
            ok = ok and not math.isnan(high) and value <= high
        return GateResult(self, value, low, high, ok)


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float
    low: float | None
    high: float | None
    passed: bool


class Headline(_Plan):
    """The one number the page leads with: DeltaMoE − ``against`` on ``metric``."""

    metric: MetricRef
    variant: str = "deltamoe"
    against: str = "param_delta"


class Bootstrap(_Plan):
    iters: int = Field(2000, ge=100)
    seed: int = 0
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


class ComparisonPlan(_Plan):
    """Everything about reading the comparison that is fixed before it runs."""

    gates: list[Gate] = Field(min_length=1)
    headline: Headline
    variant: str = "deltamoe"
    baselines: list[str] = Field(min_length=1)
    metrics: list[MetricRef] = Field(min_length=1)
    chance: dict[str, float] = Field(default_factory=dict, description=(
        "task/metric → the score of guessing (e.g. 0.25 for four-way multiple choice)"))
    bootstrap: Bootstrap = Bootstrap()

    def check(self, cells: Cells) -> list[GateResult]:
        return [gate.check(cells) for gate in self.gates]


def load_plan(path: str | Path) -> ComparisonPlan:
    """Read and validate a plan file; one :class:`ConfigError` naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([("", f"cannot read the comparison plan: {err}")], str(path)) from None
    data, lines = parse_yaml(text, str(path))
    try:
        return ComparisonPlan.model_validate(data or {})
    except ValidationError as err:
        issues = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
                  for e in err.errors(include_url=False)]
        raise ConfigError(issues, str(path), lines) from None
