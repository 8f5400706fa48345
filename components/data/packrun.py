"""The data stage's last step: one Ray task per language packs its kept documents into shards.

Languages are independent token streams, so they pack in parallel; within a language the order
is the stable key order — the unit workers named each language's files by their first key,
and a file's rows are in key order — so the shards are the same whatever the number of actors,
blocks or nodes that made them. The task reads one unit's file at a time, skips the keys the
dedup steps listed under ``drop/<lang>/`` for that file's key range (row-group statistics of the
sorted drop files keep that read to the range), repeats rehydrated documents, and writes shards
through fsspec straight into the stage folder. It returns counts and shard names.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from components.data.pack import LanguageQuota, SequencePacker, ShardWriter, with_eos
from components.data.shuffle import list_parquet

__all__ = ["pack_language"]

_READ_ROWS = 1024  # documents per read batch: memory follows this, not the language's size


def _drop_keys(drops: pds.Dataset | None, lo: int, hi: int) -> np.ndarray:
    if drops is None:
        return np.zeros(0, dtype=np.int64)
    table = drops.to_table(columns=["key"],
                           filter=(pc.field("key") >= lo) & (pc.field("key") <= hi))
    return table.column("key").to_numpy()


def pack_language(work: str, out: str, storage_options: dict[str, Any], lang: str,
                  quota: LanguageQuota, seq_len: int, eos: int, rows_per_shard: int,
                  source_names: list[str]) -> dict[str, Any]:
    """Pack ``lang``: shards under ``out``; returns documents, tokens, the leftover partial
    sequence, LID confusion of the kept documents and the files written."""
    fs, root = fsspec.core.url_to_fs(work, **storage_options)
    root = root.rstrip("/")
    out_fs, out_root = fsspec.core.url_to_fs(out, **storage_options)
    drop_files = list_parquet(fs, f"{root}/drop/{lang}")
    drops = pds.dataset(drop_files, format="parquet", filesystem=fs) if drop_files else None
    writer = ShardWriter(out_fs, out_root, seq_len, rows_per_shard)
    packer = SequencePacker(writer, seq_len, {lang: quota}, source_names)
    docs, tokens = 0, 0
    confusion: Counter[tuple[str, str]] = Counter()
    for path in list_parquet(fs, f"{root}/docs/{lang}"):
        with fs.open(path, "rb") as handle:
            pf = pq.ParquetFile(handle)
            keys = pf.read(columns=["key"]).column("key").to_numpy()
            dropped = _drop_keys(drops, int(keys.min()), int(keys.max())) if len(keys) else []
            for batch in pf.iter_batches(_READ_ROWS):
                table = pa.Table.from_batches([batch])
                keep = ~np.isin(table.column("key").to_numpy(), dropped)
                table = table.filter(pa.array(keep))
                if not table.num_rows:
                    continue
                for label, lid in zip(table.column("label").to_pylist(),
                                      table.column("lid").to_pylist(), strict=True):
                    if label and lid:
                        confusion[label, lid] += 1
                copies = table.column("copies").to_numpy()
                if (copies != 1).any():  # rehydration: each copy follows its original
                    table = table.take(pa.array(np.repeat(np.arange(table.num_rows), copies)))
                docs += int(keep.sum())
                flat, starts = with_eos(table.column("input_ids").combine_chunks(), eos)
                lengths = np.diff(np.append(starts, len(flat)))
                tokens += len(flat)
                packer.add(lang, flat, np.repeat(table.column("source").to_numpy(), lengths))
    writer.close()
    return {"lang": lang, "documents": docs, "tokens": tokens,
            "leftover": packer.leftover().get(lang, 0),
            "confusion": [[a, b, n] for (a, b), n in sorted(confusion.items())],
            "files": list(writer.files)}
