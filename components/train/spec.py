"""What a training run needs, as plain picklable values (it travels into every Ray worker)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from components.config import TrainConfig

Mode = Literal["cpt_moe", "dense", "pretrain", "sft"]
MODES: tuple[str, ...] = ("cpt_moe", "dense", "pretrain", "sft")


class TrainError(ValueError):
    """A training run that cannot start or finish: the message names the input at fault."""


@dataclass(frozen=True)
class Resources:
    """Where the per-worker loop runs: ``launcher`` "ray" (TorchTrainer), "inline" (the driver
    process, one rank, for tiny CPU runs) or "spawn" (``num_workers`` local processes in one
    torch process group, no Ray)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    launcher: Literal["ray", "inline", "spawn"] = "ray"
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom, per Ray worker

    @property
    def world_size(self) -> int:
        return 1 if self.launcher == "inline" else self.num_workers

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"


@dataclass(frozen=True)
class TrainSpec:
    """One training run.

    ``mode``: ``cpt_moe`` (upcycled MoE: anchor/shared frozen per ``freeze_*``, balance and LPR
    losses), ``dense`` (continued pre-training of a dense model, everything trains),
    ``pretrain`` (the same from a randomly initialised model), ``sft`` (parquet rows carry
    ``labels`` with -100 where no loss is taken). ``train_layers`` (a dense mode) trains those
decoder layers only, everything else frozen: a block-expanded model's new blocks.
``checkpoint_root``/``run_name`` name where the
    DCP checkpoints live: the same pair on a rerun resumes. ``tokens`` (a token budget) overrides
    ``steps`` when set. ``fail_at_step``/``fail_marker`` are a fault-injection hook for tests:
    the last rank raises once at that step unless the marker file exists (it creates it first).
    """

    init_dir: str
    out_dir: str
    train_paths: list[str]
    validation_paths: list[str]
    mode: Mode
    train: TrainConfig
    checkpoint_root: str
    run_name: str
    resources: Resources = Resources()
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    steps: int | None = None
    tokens: int | None = None
    seed: int = 0
    freeze_anchor: bool = True
    freeze_shared: bool = True
    train_layers: tuple[int, ...] | None = None  # only these decoder layers train (block expansion)
    max_validation_rows: int = 256
    fail_at_step: int | None = None
    fail_marker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TrainError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not self.train_paths:
            raise TrainError("no training parquet files given")

    def tokens_per_step(self, seq_len: int) -> int:
        return (self.train.micro_batch_size * self.train.grad_accum
                * self.resources.world_size * seq_len)

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the main phase: ``tokens`` / tokens per step, else ``steps``."""
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / self.tokens_per_step(seq_len)))
        return self.steps if self.steps is not None else self.train.steps

    def review_steps(self) -> int:
        review = self.train.review
        return review.steps if (review.enabled and self.mode == "cpt_moe") else 0

    def warmup(self, steps: int) -> int:
        return min(self.train.warmup_steps, steps)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports: the exported model, step and token counts, final metrics
    (validation loss per language before and after), and how many restarts happened."""

    out_dir: str
    steps: int
    tokens: int
    seconds: float
    metrics: dict[str, float]
    checkpoint: str
    resumed_from: int | None = None
    attempts: int = 1
    counts: dict[str, int] = field(default_factory=dict)
    step_seconds: float = 0.0  # wall time of the step loop (setup and first validation excluded)
