"""Run the per-worker loop (Ray Train ``TorchTrainer`` or inline) and export the result.

The driver scans the parquet (languages, sequence length), skips training when the newest
complete checkpoint already holds every planned step, launches the loop otherwise, follows
rank 0's ``progress.json`` with a progress bar, and finally converts the newest checkpoint into a
HF model directory. Checkpoints of both launchers are ``<checkpoint_root>/<run_name>/
checkpoint_<step>``, so a rerun with the same pair resumes whichever launcher wrote them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from components.train.checkpoint import export_hf, is_complete, read_state
from components.train.data import columns_of, scan
from components.train.session import (
    CHECKPOINT_PREFIX,
    STARTS,
    InlineSession,
    read_progress,
)
from components.train.spec import TrainError, TrainResult, TrainSpec

log = logging.getLogger(__name__)

# Training data up to this share of the cluster's object store is read once and kept there
# (``Dataset.materialize``) instead of being streamed from files again every epoch.
CACHE_FRACTION = 0.25


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (either launcher's), or None."""
    if not run_dir.is_dir():
        return None
    found = sorted(p for p in run_dir.iterdir()
                   if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and is_complete(p))
    return found[-1] if found else None


def run(spec: TrainSpec) -> TrainResult:
    """Train (or resume) and export ``spec.out_dir``; returns what happened."""
    if not (Path(spec.init_dir) / "config.json").exists():
        raise TrainError(f"{spec.init_dir}: no config.json (not a model directory)")
    languages, _, seq_len = scan(spec.train_paths)
    if spec.validation_paths:
        languages = sorted(set(languages) | set(scan(spec.validation_paths)[0]))
    run_dir = Path(spec.checkpoint_root) / spec.run_name
    total = spec.total_steps(seq_len) + spec.review_steps()
    started = time.perf_counter()
    starts_before = len(_starts(run_dir))
    latest = latest_checkpoint(run_dir)
    if latest is None or read_state(latest)["step"] < total:
        _log_training_data(spec)
        launch = {"inline": _inline, "spawn": _spawn}.get(spec.resources.launcher, _ray)
        launch(spec, languages, seq_len, run_dir, total)
        latest = latest_checkpoint(run_dir)
    if latest is None:
        raise TrainError(f"{run_dir}: training finished without a checkpoint")
    state = read_state(latest)
    if state["step"] < total:
        raise TrainError(f"{latest}: the newest checkpoint holds step {state['step']} of {total}")
    starts = _starts(run_dir)[starts_before:]
    card = _card(spec, state, languages)
    # Under a caller's process group (torchrun, mp.spawn) every rank gets here; one exports.
    grouped = dist.is_initialized() and dist.get_world_size() > 1
    if not grouped or dist.get_rank() == 0:
        export_hf(latest, spec.init_dir, spec.out_dir, card=card)
    if grouped:
        dist.barrier()
    metrics = {k: float(v) for k, v in {**state.get("initial", {}),
                                          **state.get("final", {})}.items()}
    return TrainResult(out_dir=spec.out_dir, steps=int(state["step"]),
                       tokens=int(state["tokens"]), seconds=time.perf_counter() - started,
                       metrics=metrics, checkpoint=str(latest),
                       resumed_from=starts[-1]["resumed_from"] if starts else None,
                       attempts=len(starts), counts=state.get("counts", {}),
                       step_seconds=float(state.get("step_seconds", 0.0)))


def _starts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / STARTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log_training_data(spec: TrainSpec) -> None:
    """The packed training data as the MLflow run's dataset input (folder, digest, rows and
    tokens per language), logged by rank 0 when training starts."""
    if spec.tracking_uri and spec.mlflow_run_id:
        from components.tracking import RankZeroLogger, parquet_dataset

        rank = int(os.environ.get("RANK", "0"))  # torchrun's ranks all get here
        try:
            dataset = parquet_dataset(list(spec.train_paths))
        except (OSError, ValueError, KeyError) as err:  # a record, never a reason to stop
            log.warning("training data not recorded as an MLflow dataset: %s", err)
            return
        RankZeroLogger(spec.tracking_uri, spec.mlflow_run_id, rank=rank).log_dataset(**dataset)


def _label(spec: TrainSpec) -> str:
    """What a progress bar calls a run: its checkpoint folder (the variant, e.g. ``cpt_moe``),
    not ``run_name`` (a fingerprint prefix)."""
    return Path(spec.checkpoint_root).name or spec.run_name


class _Progress:
    """A driver-side progress bar following rank 0's progress file."""

    def __init__(self, run_dir: Path, total: int, name: str) -> None:
        self.run_dir, self.total = run_dir, total
        self.bar = tqdm(total=total, desc=f"train {name}", unit="step")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self.update()

    def update(self) -> None:
        progress = read_progress(self.run_dir)
        if progress:
            self.bar.n = min(self.total, int(progress.get("step", 0)))
            if progress.get("loss") is not None:
                self.bar.set_postfix(loss=f"{progress['loss']:.3f}", refresh=False)
            self.bar.refresh()

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.update()
        self.bar.close()


def _inline(spec: TrainSpec, languages: list[str], seq_len: int, run_dir: Path,
            total: int, progress: bool = True) -> None:
    """The loop in this process: a one-rank group of its own (gloo on CPU, NCCL on GPU), or, when
    the caller already runs a process group (torchrun, ``mp.spawn``), each rank of that group."""
    from components.train.loop import Worker

    owns_group = not dist.is_initialized()
    if owns_group:
        store = tempfile.NamedTemporaryFile(prefix="deltamoe-pg-", delete=False)
        store.close()
        dist.init_process_group(spec.resources.resolved_backend(),
                                init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        session = InlineSession(run_dir, spec.train.keep_checkpoints, spec.train_paths, spec.seed)
        show = progress and session.rank == 0
        bar = _Progress(run_dir, total, _label(spec)) if show else nullcontext()
        with bar:
            Worker(spec, session, languages, seq_len).run()
    finally:
        if owns_group:
            dist.destroy_process_group()
            Path(store.name).unlink(missing_ok=True)


def _spawn(spec: TrainSpec, languages: list[str], seq_len: int, run_dir: Path,
           total: int) -> None:
    """``num_workers`` local processes, one process group (file store), each running the inline
    loop as one rank; the driver keeps the progress bar and exports afterwards."""
    import torch.multiprocessing as mp

    world = spec.resources.num_workers
    store = tempfile.NamedTemporaryFile(prefix="deltamoe-pg-", delete=False)
    store.close()
    Path(store.name).unlink()  # the file store must not exist before the group forms
    try:
        with _Progress(run_dir, total, _label(spec)):
            mp.spawn(_spawned_rank, args=(spec, languages, seq_len, run_dir, total, store.name,
                                          world), nprocs=world, join=True)
    except mp.ProcessRaisedException as err:
        raise TrainError(f"{run_dir}: a training process failed; rerun to resume from the last "
                         f"checkpoint\n{str(err).strip().splitlines()[-1]}") from None
    finally:
        Path(store.name).unlink(missing_ok=True)


def _spawned_rank(rank: int, spec: TrainSpec, languages: list[str], seq_len: int, run_dir: Path,
                  total: int, store: str, world: int) -> None:
    import torch

    if spec.resources.use_gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(spec.resources.resolved_backend(), init_method=f"file://{store}",
                            rank=rank, world_size=world)
    try:
        _inline(spec, languages, seq_len, run_dir, total, progress=False)
    finally:
        dist.destroy_process_group()


def _ray(spec: TrainSpec, languages: list[str], seq_len: int, run_dir: Path,
         total: int) -> None:
    """``TorchTrainer`` over ``num_workers`` workers; Ray Data streams each worker's shard."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from components.train.loop import train_loop_per_worker

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    res = spec.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker, **res.worker_resources}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    dataset = ray.data.read_parquet(spec.train_paths, columns=columns_of(spec.train_paths),
                                    shuffle="files")
    size = in_memory_bytes(spec.train_paths)
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    if size <= CACHE_FRACTION * store:
        # Small enough to keep: read once into the object store. Otherwise every epoch re-runs
        # the read (worker start, file listing, decoding); on short-epoch runs that cost 2x the
        # training step rate (benchmarks/train_overhead.py). Larger data keeps streaming.
        log.info("caching %.1f MiB of training data in the object store (%.0f MiB)",
                 size / 2**20, store / 2**20)
        dataset = dataset.materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "languages": languages, "seq_len": seq_len,
                           "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=spec.run_name, storage_path=str(Path(spec.checkpoint_root).resolve()),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)),
        torch_config=TorchConfig(backend=res.resolved_backend()),
        datasets={"train": dataset},
    )
    try:
        with _Progress(run_dir, total, _label(spec)):
            trainer.fit()
    except ray.train.TrainingFailedError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise TrainError(f"training {spec.run_name} failed after {spec.train.max_failures} "
                         f"restart(s) ({lines[-1] if lines else type(err).__name__}); running "
                         "it again resumes from its last checkpoint") from err


def in_memory_bytes(paths: list[str]) -> int:
    """Uncompressed size of the parquet files' row groups (from their footers, nothing read)."""
    import pyarrow.parquet as pq

    total = 0
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


def _card(spec: TrainSpec, state: dict[str, Any], languages: list[str]) -> str:
    """The exported model's card: a finetune of the model training started from (none for
    ``pretrain``, which only borrows its shapes), in the languages of the training data."""
    from components.cards import clean_title, render_card

    files = sorted({Path(p).parent.name + "/" + Path(p).name for p in spec.train_paths})
    lines = [f"Trained by deltamoe ({spec.mode}) from `{spec.init_dir}`.", "",
             f"- steps: {state['step']}", f"- tokens: {state['tokens']}",
             f"- data: {len(spec.train_paths)} parquet files ({', '.join(files[:8])}"
             f"{', …' if len(files) > 8 else ''}), languages {', '.join(languages)}"]
    final = state.get("final", {})
    if final:
        lines.append("- validation loss: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                       sorted(final.items())))
    pretrain = spec.mode == "pretrain"
    return render_card(clean_title(spec.out_dir), "\n".join(lines),
                       base_model=[] if pretrain else [spec.init_dir],
                       relation=None if pretrain else "finetune", languages=languages,
                       inputs=[] if pretrain else [spec.init_dir], tags=[spec.mode])
