"""Packing: kept documents → fixed-length sequences of one language, written as parquet shards.

Each language is one token stream: its kept documents in corpus order, each followed by EOS,
cut into ``seq_len`` pieces. A sequence never holds two languages, nothing is padded, and the
only tokens lost are the final partial sequence of each language (counted). Sequence ``k`` of a
language goes to training when ``k`` is below the mix's count, to validation when it is among
the language's last ``n_validation`` sequences (a held-out tail, so train and validation never
share a sequence), and is left out otherwise (the mix took fewer tokens). A sequence's ``source``
is the source of its first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["LanguageQuota", "SequencePacker", "ShardWriter", "with_eos"]

SPLITS = ("train", "validation")


def with_eos(column: pa.ListArray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat tokens of every document with EOS after each, and each document's start offset."""
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    flat = np.insert(values, offsets[1:], eos)
    starts = offsets[:-1] + np.arange(len(offsets) - 1)
    return flat, starts


class ShardWriter:
    """Buffers sequences per (split, language) and writes shards of ``rows_per_shard`` rows."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, seq_len: int,
                 rows_per_shard: int) -> None:
        self.fs, self.root, self.seq_len = fs, root.rstrip("/"), seq_len
        self.rows_per_shard = max(1, rows_per_shard)
        self.buffers: dict[tuple[str, str], list[tuple[np.ndarray, list[str]]]] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.shards: dict[tuple[str, str], int] = {}
        self.files: list[str] = []
        for split in SPLITS:
            fs.makedirs(f"{self.root}/{split}", exist_ok=True)

    def add(self, split: str, lang: str, rows: np.ndarray, sources: list[str]) -> None:
        key = (split, lang)
        self.buffers.setdefault(key, []).append((rows, sources))
        self.counts[key] = self.counts.get(key, 0) + len(rows)
        if self.counts[key] >= self.rows_per_shard:
            self._flush(key, final=False)

    def _flush(self, key: tuple[str, str], final: bool) -> None:
        parts = self.buffers.get(key, [])
        if not parts:
            return
        rows = np.concatenate([p[0] for p in parts])
        sources = [s for p in parts for s in p[1]]
        cut = len(rows) if final else len(rows) - len(rows) % self.rows_per_shard
        for start in range(0, cut, self.rows_per_shard):
            self._write(key, rows[start:start + self.rows_per_shard],
                        sources[start:start + self.rows_per_shard])
        self.buffers[key] = [(rows[cut:], sources[cut:])] if cut < len(rows) else []
        self.counts[key] = len(rows) - cut

    def _write(self, key: tuple[str, str], rows: np.ndarray, sources: list[str]) -> None:
        split, lang = key
        index = self.shards.get(key, 0)
        self.shards[key] = index + 1
        n = len(rows)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * self.seq_len)
        ids = pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), pa.int32()))
        table = pa.table({"input_ids": ids, "lang": pa.array([lang] * n, pa.string()),
                          "source": pa.array(sources, pa.string())})
        path = f"{self.root}/{split}/{lang}-{index:05d}.parquet"
        with self.fs.open(path, "wb") as handle:
            pq.write_table(table, handle)
        self.files.append(path)

    def close(self) -> None:
        for key in list(self.buffers):
            self._flush(key, final=True)


@dataclass
class LanguageQuota:
    """Where the sequences of one language go: the first ``train`` to training, the last
    ``validation`` of ``total`` to validation."""

    total: int
    train: int
    validation: int


@dataclass
class _Stream:
    tokens: list[np.ndarray] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)  # source code of each token
    length: int = 0
    emitted: int = 0


class SequencePacker:
    """Per-language carry buffers; :meth:`add` emits full sequences to the writer in order."""

    def __init__(self, writer: ShardWriter, seq_len: int, quotas: dict[str, LanguageQuota],
                 source_names: list[str]) -> None:
        self.writer, self.seq_len, self.quotas = writer, seq_len, quotas
        self.source_names = source_names
        self.streams: dict[str, _Stream] = {}

    def add(self, lang: str, flat: np.ndarray, sources: np.ndarray) -> None:
        """Append ``flat`` (documents with EOS); ``sources[i]`` is the source code (an index
        into ``source_names``) of token ``i``."""
        stream = self.streams.setdefault(lang, _Stream())
        stream.tokens.append(flat)
        stream.sources.append(sources)
        stream.length += len(flat)
        full = stream.length // self.seq_len
        if full:
            self._emit(lang, stream, full)

    def _emit(self, lang: str, stream: _Stream, full: int) -> None:
        tokens = np.concatenate(stream.tokens)
        sources = np.concatenate(stream.sources)
        used = full * self.seq_len
        rows = tokens[:used].reshape(full, self.seq_len)
        first = sources[:used:self.seq_len]
        stream.tokens, stream.sources = [tokens[used:]], [sources[used:]]
        stream.length -= used
        quota = self.quotas[lang]
        index = np.arange(stream.emitted, stream.emitted + full)
        stream.emitted += full
        for split, mask in (("train", index < quota.train),
                            ("validation", index >= quota.total - quota.validation)):
            if mask.any():
                picked = np.flatnonzero(mask)
                self.writer.add(split, lang, rows[picked],
                                [self.source_names[c] for c in first[picked]])

    def leftover(self) -> dict[str, int]:
        """Tokens of each language's final partial sequence (dropped)."""
        return {lang: s.length for lang, s in self.streams.items()}
