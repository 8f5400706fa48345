"""Continued pre-training (and the dense pre-training / SFT modes) on Ray Train.

One per-worker loop (:mod:`components.train.loop`) runs under Ray Train's ``TorchTrainer`` with
FSDP2 on NCCL (GPU) or gloo (CPU), or — for tiny CPU runs where Ray's ~25 s of setup per run
would dominate — in the driver process as a one-rank gloo group with the same sharding,
checkpoint and metrics code (``resources.launcher: inline``). :func:`train_model` is the entry
point; it takes a :class:`TrainSpec` (plain paths and config sections, never the whole run
config) and returns a :class:`TrainResult` after exporting the final model as a HF directory.
"""

from components.train.spec import Resources, TrainResult, TrainSpec

__all__ = ["Resources", "TrainResult", "TrainSpec", "train_model"]


def train_model(spec: TrainSpec) -> TrainResult:
    """Train as ``spec`` says and export the result; see :func:`components.train.launch.run`."""
    from components.train.launch import run

    return run(spec)
