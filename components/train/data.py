"""Training batches from the data stage's parquet: Ray Data shards per worker, or pyarrow inline.

Rows hold ``input_ids`` (fixed length), ``lang`` and, for SFT, ``labels`` (-100 where no loss).
Both paths yield the same numpy batches, turned into tensors by :func:`collate`; an epoch that
ends starts the next one, so a run takes exactly its planned number of steps whatever the data
size. A resumed run passes ``skip`` (the micro batches its checkpoint already consumed), so it
continues at the same position of the same epoch instead of starting a fresh one: the local
stream is a pure function of (seed, epoch), so an interrupted and resumed run sees exactly the
batches an uninterrupted one would; a Ray Data shard resumes at the same count within its epoch
(which rows a shard yields in which order is Ray's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from components.train.spec import TrainError

COLUMNS = ("input_ids", "lang")
IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, -100 = no loss (next-token targets not yet shifted)
    lang_index: torch.Tensor  # [B] int64 into the run's language list
    weight: torch.Tensor  # [B] float: 0 for padding rows (validation shards)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.lang_index, self.weight)))

    @property
    def tokens(self) -> int:
        """Input tokens (what throughput and token budgets count), padding rows excluded."""
        return int((self.weight > 0).sum()) * self.input_ids.shape[1]


def _stack(column: np.ndarray) -> np.ndarray:
    if column.dtype == object:
        return np.stack([np.asarray(row) for row in column])
    return np.asarray(column)


def collate(rows: dict[str, np.ndarray], languages: Sequence[str]) -> Batch:
    """A numpy batch (Ray's ``batch_format="numpy"`` or pyarrow) → tensors."""
    ids = torch.from_numpy(_stack(rows["input_ids"]).astype(np.int64))
    labels = (torch.from_numpy(_stack(rows["labels"]).astype(np.int64)) if "labels" in rows
              else ids.clone())
    index = {tag: i for i, tag in enumerate(languages)}
    try:
        langs = torch.tensor([index[str(t)] for t in rows["lang"]], dtype=torch.long)
    except KeyError as err:
        raise TrainError(f"row language {err} is not one of {list(languages)}") from None
    weight = torch.ones(ids.shape[0])
    return Batch(ids, labels, langs, weight)


def columns_of(paths: Sequence[str]) -> list[str]:
    schema = pq.read_schema(paths[0])
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise TrainError(f"{paths[0]}: missing column(s) {', '.join(missing)}; expected "
                         "input_ids (list<int32>) and lang")
    return [c for c in (*COLUMNS, "labels") if c in schema.names]


def scan(paths: Sequence[str]) -> tuple[list[str], int, int]:
    """Languages present (sorted), row count and sequence length of a parquet set."""
    if not paths:
        raise TrainError("no parquet files to train on")
    langs: set[str] = set()
    rows, seq_len = 0, 0
    for path in paths:
        table = pq.read_table(path, columns=["lang"])
        langs.update(table.column("lang").unique().to_pylist())
        rows += table.num_rows
        if not seq_len and table.num_rows:
            first = pq.read_table(path, columns=["input_ids"]).slice(0, 1)
            seq_len = len(first.column("input_ids")[0].as_py())
    if rows == 0:
        raise TrainError(f"{paths[0]}: the training data has no rows")
    return sorted(langs), rows, seq_len


def _read(paths: Sequence[str]) -> pa.Table:
    columns = columns_of(paths)
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])


def local_batches(paths: Sequence[str], batch_size: int, languages: Sequence[str], seed: int,
                  rank: int = 0, world: int = 1, skip: int = 0) -> Iterator[Batch]:
    """Endless shuffled batches of this rank's rows (rows ``rank::world``), epoch after epoch,
    starting after the first ``skip`` batches (computed, not read: resuming deep into a long run
    costs nothing)."""
    table = _read(paths)
    rows = np.arange(table.num_rows)[rank::world]
    if len(rows) < batch_size:
        raise TrainError(f"{len(rows)} training rows per worker is less than one micro batch "
                         f"({batch_size}); lower train.micro_batch_size or add data")
    per_epoch = len(rows) // batch_size
    epoch, first = divmod(max(skip, 0), per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(rows)
        for start in range(first * batch_size, per_epoch * batch_size, batch_size):
            chunk = table.take(order[start:start + batch_size])
            yield collate({c: chunk.column(c).to_numpy(zero_copy_only=False)
                           for c in chunk.column_names}, languages)
        epoch, first = epoch + 1, 0


def ray_batches(shard: object, batch_size: int, languages: Sequence[str],
                skip: int = 0) -> Iterator[Batch]:
    """Endless batches from a Ray Data shard (``ray.train.get_dataset_shard``), starting after
    the first ``skip``: the batches of the resumed epoch are read and dropped, whole epochs
    before it are counted off once the first pass has told how many batches an epoch holds."""
    per_epoch: int | None = None
    while True:
        produced = 0
        for rows in shard.iter_batches(batch_size=batch_size,  # type: ignore[attr-defined]
                                       batch_format="numpy", drop_last=True):
            produced += 1
            if skip > 0:
                skip -= 1
                continue
            yield collate(rows, languages)
        if produced == 0:
            raise TrainError("this worker's data shard holds less than one micro batch; lower "
                             "train.micro_batch_size or resources.num_workers, or add data")
        if per_epoch is None and skip > 0:
            per_epoch = produced
            skip %= per_epoch


def validation_batches(paths: Sequence[str], batch_size: int, languages: Sequence[str],
                       max_rows: int, rank: int, world: int) -> list[Batch]:
    """This rank's share of the first ``max_rows`` validation rows; every rank gets the same
    number of batches (padding rows have weight 0), as FSDP needs all ranks in each forward."""
    if not paths:
        return []
    table = _read(paths).slice(0, max_rows)
    per_rank = -(-table.num_rows // world)
    mine = list(range(rank, table.num_rows, world))
    batches = []
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        count = min(batch_size, per_rank - start)
        pad = count - len(idx)
        chunk = table.take(idx + [0] * pad)
        batch = collate({c: chunk.column(c).to_numpy(zero_copy_only=False)
                         for c in chunk.column_names}, languages)
        if pad:
            batch.weight[len(idx):] = 0.0
        batches.append(batch)
    return batches


class Prefetcher:
    """Batches of ``source`` read ``depth`` ahead in a background thread, so the step never
    waits on the loader (parquet ``take``, collation, Ray Data's iterator); on CUDA each batch
    is pinned there too, so the step's ``non_blocking`` copy overlaps compute. The order is the
    source's (one producer), so resumed streams stay exact; an error in the source is raised at
    the ``next`` that would have returned its batch. :meth:`close` stops the thread."""

    def __init__(self, source: Iterator[Batch], depth: int, pin: bool = False) -> None:
        import queue
        import threading

        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._source, self._pin = source, pin
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for batch in self._source:
                if self._pin:
                    batch = Batch(*(t.pin_memory() for t in (batch.input_ids, batch.labels,
                                                             batch.lang_index, batch.weight)))
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer, which raises it
            self._put(("error", err))

    def _put(self, item: tuple[str, Any]) -> bool:
        """Queue ``item`` unless :meth:`close` was called first (False then)."""
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def prefetched(source: Iterator[Batch], depth: int, pin: bool = False) -> Iterator[Batch]:
    """``source`` behind a :class:`Prefetcher` of ``depth`` batches (``depth`` 0: as it is)."""
    return Prefetcher(source, depth, pin) if depth > 0 else source
