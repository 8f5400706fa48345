"""Where the per-worker loop gets its rank, data, checkpoints and reports: Ray Train or inline.

The loop never calls Ray directly, so the same function runs in a Ray Train worker
(:class:`RaySession`: ``get_dataset_shard``, ``get_checkpoint``, ``report(checkpoint=...)``) and
in the driver process (:class:`InlineSession`: pyarrow batches, checkpoint folders under
``<checkpoint_root>/<run_name>/`` with the same keep-last-M rule, resume from the newest
complete one). Rank 0 also writes ``progress.json`` beside the checkpoints, which the driver's
progress bar follows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from components.storage import atomic_write_bytes
from components.train.checkpoint import is_complete
from components.train.data import Batch, local_batches, ray_batches

PROGRESS = "progress.json"
STARTS = "starts.jsonl"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def write_progress(run_dir: str | Path, data: dict[str, Any]) -> None:
    from fsspec.implementations.local import LocalFileSystem

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(LocalFileSystem(), str(Path(run_dir) / PROGRESS),
                       json.dumps(data).encode())


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / PROGRESS).read_text())
    except (FileNotFoundError, ValueError):
        return None


def record_start(run_dir: str | Path, resumed_from: int | None, world_size: int) -> None:
    """Rank 0 notes each start of the loop (a restart after a failure is a new start)."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / STARTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"resumed_from": resumed_from, "world_size": world_size,
                                 "time": time.time()}) + "\n")


class InlineSession:
    """The ranks of the caller's process group (one rank in the driver when there is none, or
    each process started by torchrun/``mp.spawn``); checkpoints as folders on a filesystem every
    rank sees, newest complete one resumes."""

    def __init__(self, run_dir: str | Path, keep: int, train_paths: Sequence[str],
                 seed: int) -> None:
        import torch.distributed as dist

        self.run_dir = Path(run_dir)
        self.keep = keep
        self.train_paths = list(train_paths)
        self.seed = seed
        grouped = dist.is_initialized()
        self.rank = dist.get_rank() if grouped else 0
        self.world_size = dist.get_world_size() if grouped else 1
        self.attempt = 1

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def batches(self, batch_size: int, languages: Sequence[str],
                skip: int = 0) -> Iterator[Batch]:
        return local_batches(self.train_paths, batch_size, languages, self.seed,
                             rank=self.rank, world=self.world_size, skip=skip)

    def checkpoints(self) -> list[Path]:
        if not self.run_dir.exists():
            return []
        return sorted(p for p in self.run_dir.iterdir()
                      if p.name.startswith(CHECKPOINT_PREFIX) and is_complete(p))

    def restore(self) -> AbstractContextManager[Path | None]:
        found = self.checkpoints()
        return nullcontext(found[-1] if found else None)

    def report(self, step: int, metrics: dict[str, float],
               write: Callable[[Path], None] | None) -> None:
        if write is None:
            return
        final = self.run_dir / checkpoint_name(step)
        tmp = self.run_dir / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        write(tmp)  # collective: every rank writes its shards
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def progress(self, data: dict[str, Any]) -> None:
        if self.rank == 0:
            write_progress(self.run_dir, data)


class RaySession:
    """Inside a Ray Train V2 worker."""

    def __init__(self, run_dir: str) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.run_dir = Path(run_dir)
        self.attempt = 1

    def batches(self, batch_size: int, languages: Sequence[str],
                skip: int = 0) -> Iterator[Batch]:
        import ray.train

        return ray_batches(ray.train.get_dataset_shard("train"), batch_size, languages, skip)

    @contextmanager
    def _restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def restore(self) -> AbstractContextManager[Path | None]:
        return self._restore()

    def report(self, step: int, metrics: dict[str, float],
               write: Callable[[Path], None] | None) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if write is None:
            ray.train.report(metrics)
            return
        # Written locally, then copied to storage by Ray in the background (ASYNC) while the
        # next steps run; Ray deletes the local copy once uploaded. A synchronous copy stalled
        # every rank for the whole upload at each checkpoint.
        tmp = tempfile.mkdtemp(prefix="deltamoe-ckpt-")
        try:
            write(Path(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def progress(self, data: dict[str, Any]) -> None:
        if self.rank == 0:
            write_progress(self.run_dir, data)
