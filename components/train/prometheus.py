"""Training progress as Ray application metrics, so Prometheus and Grafana show it beside Ray's.

MLflow holds the full history of a run; an operator watching a cluster wants the live figures in
the same place as Ray's own (worker state, checkpoint time, GPU use). Under Ray (the ``ray``
launcher's workers, or an inline driver attached to a Ray cluster) rank 0 sets these gauges at
every log step, and each node's metrics agent exports them on its Prometheus endpoint (Ray puts
``ray_`` before the names)::

    deltamoe_train_step{run, mode}                 optimizer steps done
    deltamoe_train_progress{run, mode}             steps done / steps planned
    deltamoe_train_tokens_per_second{run, mode}    over the last log window, every rank
    deltamoe_train_loss{run, mode, lang}           lang="all" for the whole batch
    deltamoe_train_learning_rate{run, mode}
    deltamoe_train_grad_norm{run, mode}

Outside Ray, or where Ray's metrics cannot be created, nothing is exported and training goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["METRICS", "TrainGauges"]

log = logging.getLogger(__name__)

_PLAIN = {  # gauge name → (description, the loop's metric it shows)
    "tokens_per_second": ("Training tokens per second, all ranks, last log window.",
                          "train/tokens_per_s"),
    "learning_rate": ("Learning rate of the last optimizer step.", "train/lr"),
    "grad_norm": ("Gradient norm before clipping, last optimizer step.", "train/grad_norm"),
}
_STEP = {"step": "Optimizer steps done.",
         "progress": "Optimizer steps done over steps planned."}
# every gauge's name as the project creates it (Prometheus shows it with Ray's ``ray_`` prefix)
METRICS = tuple(f"deltamoe_train_{n}" for n in (*_STEP, *_PLAIN, "loss"))


class TrainGauges:
    """Rank 0's live training figures as Ray gauges (a no-op outside Ray)."""

    def __init__(self, run: str, mode: str) -> None:
        self.gauges: dict[str, Any] = {}
        try:
            import ray
            from ray.util.metrics import Gauge
        except ImportError:
            return
        if not ray.is_initialized():
            return
        tags = {"run": run, "mode": mode}
        try:
            described = {**_STEP, **{k: d for k, (d, _) in _PLAIN.items()}}
            for name, description in described.items():
                gauge = Gauge(f"deltamoe_train_{name}", description=description,
                              tag_keys=("run", "mode"))
                gauge.set_default_tags(tags)
                self.gauges[name] = gauge
            loss = Gauge("deltamoe_train_loss", description="Training loss, per language "
                         "(lang=all: the whole batch), last log window.",
                         tag_keys=("run", "mode", "lang"))
            loss.set_default_tags(tags)
            self.gauges["loss"] = loss
        except Exception as err:  # metrics are an aid: never the reason a run fails
            log.warning("Ray metrics unavailable, training goes on without them: %s", err)
            self.gauges = {}

    def update(self, step: int, total: int, metrics: Mapping[str, float]) -> None:
        """Set every gauge from one log step's metrics (``train/loss``, ``train/loss/<lang>``,
        ``train/tokens_per_s``, ``train/lr``, ``train/grad_norm``)."""
        if not self.gauges:
            return
        self.gauges["step"].set(step)
        self.gauges["progress"].set(step / total if total else 0.0)
        for name, (_, key) in _PLAIN.items():
            if key in metrics:
                self.gauges[name].set(float(metrics[key]))
        for key, value in metrics.items():
            if key == "train/loss":
                self.gauges["loss"].set(float(value), tags={"lang": "all"})
            elif key.startswith("train/loss/"):
                self.gauges["loss"].set(float(value), tags={"lang": key.rsplit("/", 1)[1]})
