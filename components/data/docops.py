"""The data stage's map step: one actor reads work units and does every per-document step.

A :class:`UnitWorker` (a Ray Data actor) takes a :class:`~components.data.sources.WorkUnit`,
streams its documents batch by batch and, per batch: drops over-long documents before anything
looks at them, tags languages, applies the quality filters, and — for the documents still kept —
hashes, MinHashes and tokenizes them. It writes what later steps need straight to the stage's
work folder through fsspec: the kept documents' tokens per language (``docs/<lang>/<key>``,
one file per unit and language, so file names in key order are the corpus order) and the small
dedup rows routed to their shuffle partition (``exact/<partition>/<unit>``). What it returns
is counts only: the driver never sees a token or a text.

One operator instead of four: each actor loads the LID model and the tokenizer once, and on a
small machine one actor pool leaves CPUs to the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import DataConfig
from components.data.dedup import EXACT_DUPLICATE, MinHasher, exact_hashes, normalize
from components.data.errors import DataError
from components.data.filters import QualityFilter
from components.data.lid import LanguageTagger
from components.data.readers import CLUSTER_SIZE
from components.data.sources import SourceFiles, WorkUnit
from components.data.textops import collapse_whitespace
from components.data.tokenize import TokenizeBatch

__all__ = [
    "COUNT_SCHEMA",
    "DOCS_SCHEMA",
    "UnitWorker",
    "doc_key",
    "exact_schema",
    "rehydration_copies",
]

#: kept documents of one language, in key order (what the packer reads)
DOCS_SCHEMA = pa.schema([("key", pa.int64()), ("input_ids", pa.list_(pa.int32())),
                         ("source", pa.int16()), ("label", pa.string()), ("lid", pa.string()),
                         ("copies", pa.int32())])
#: one count: what (``in``, ``drop``, ``quality``, ``tokens``, ``bad_docs``, ``bad_chars``,
#: ``confusion``, ``node``: units a node read), for whom (language or dataset label), detail
#: (reason or predicted tag)
COUNT_SCHEMA = pa.schema([("kind", pa.string()), ("lang", pa.string()),
                          ("detail", pa.string()), ("n", pa.int64())])
_FILE_BITS, _ROW_BITS = 24, 32
_SEEN_LIMIT = 1 << 18  # exact hashes a unit remembers for its own repeats (~20 MB)


def doc_key(source: int, file: int, row: np.ndarray) -> np.ndarray:
    """The stable document key ``(source, file, row)`` packed into one int64, so that integer
    order is corpus order: sources as the config lists them, files sorted, rows in order."""
    if source >= 128 or file >= 2**_FILE_BITS or (len(row) and int(row.max()) >= 2**_ROW_BITS):
        raise DataError(f"source {source}, file {file}: more than 127 sources, 2^24 files per "
                        "source or 2^32 rows per file do not fit the stage's document key")
    return (np.int64(source) << np.int64(_FILE_BITS + _ROW_BITS)) | \
        (np.int64(file) << np.int64(_ROW_BITS)) | row.astype(np.int64)


def exact_schema(minhash_perm: int | None) -> pa.Schema:
    """Rows of the exact-dedup shuffle: scope, 128-bit hash, key, language, tokens (and the
    MinHash signature, for the near-dedup step that follows on the exact survivors)."""
    fields = [("scope", pa.int32()), ("h1", pa.uint64()), ("h2", pa.uint64()),
              ("key", pa.int64()), ("lang", pa.int32()), ("ntok", pa.int64())]
    if minhash_perm:
        fields.append(("minhash", pa.list_(pa.uint32(), minhash_perm)))
    return pa.schema(fields)


def rehydration_copies(sizes: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Copies of each document: the value of the largest ``table`` key ≤ its cluster size
    (FineWeb2's rehydration), 1 below the smallest key."""
    copies = np.ones(len(sizes), dtype=np.int32)
    for least in sorted(table):
        copies[sizes >= least] = table[least]
    return copies


def _rows(values: Any, keep: np.ndarray) -> Any:
    """Rows ``keep`` (ascending) of an Arrow array or table; the input itself when they are all
    its rows (the common case: no copy of the batch's text)."""
    return values if len(keep) == len(values) else values.take(pa.array(keep))


class _Sinks:
    """Parquet files a unit writes, opened on first use and closed together."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs
        self.open: dict[str, tuple[Any, pq.ParquetWriter]] = {}

    def write(self, path: str, table: pa.Table) -> None:
        if path not in self.open:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
            handle = self.fs.open(path, "wb")
            # read once by the next step: not worth compressing or dictionary-encoding
            self.open[path] = (handle, pq.ParquetWriter(handle, table.schema,
                                                        compression="none",
                                                        use_dictionary=False))
        self.open[path][1].write_table(table)

    def close(self) -> None:
        for handle, writer in self.open.values():
            writer.close()
            handle.close()
        self.open.clear()


class UnitWorker:
    """Ray Data class UDF over work units (one row each): documents → files and counts."""

    def __init__(self, data: DataConfig, languages: Sequence[str], plans: list[SourceFiles],
                 tokenizer_json: str, work: str, storage_options: dict[str, Any],
                 partitions: int, seed: int, tokenizer_threads: int | None = None) -> None:
        lid = data.lid
        self.data, self.languages, self.plans = data, list(languages), plans
        self.lang_index = {t: i for i, t in enumerate(self.languages)}
        self.tagger = LanguageTagger(lid.backend, languages, lid.mode, lid.threshold,
                                     dict(lid.thresholds), lid.model_path)
        self.filter = QualityFilter(data.filters, languages)
        limits = [data.filters.max_chars] + [t.max_chars for t in
                                             data.filters.per_language.values()]
        self.cut = None if any(x is None for x in limits) else max(x for x in limits if x)
        self.minhash = MinHasher(data.dedup.num_perm, seed) if data.dedup.minhash else None
        self.dedup = data.dedup.exact or data.dedup.minhash
        self.tokenize = TokenizeBatch(tokenizer_json, tokenizer_threads)
        self.fs, root = fsspec.core.url_to_fs(work, **storage_options)
        self.root = root.rstrip("/")
        self.partitions = partitions
        self.exact_schema = exact_schema(data.dedup.num_perm if self.minhash else None)

    def __call__(self, units: pa.Table) -> pa.Table:
        import ray

        counts: Counter[tuple[str, str, str]] = Counter()
        for unit in units.to_pylist():
            self._unit(WorkUnit(**unit), counts)
            counts["node", ray.get_runtime_context().get_node_id(), ""] += 1
        rows = [(k, lang, d, n) for (k, lang, d), n in sorted(counts.items())]
        return pa.Table.from_pylist([dict(zip(COUNT_SCHEMA.names, r, strict=True))
                                     for r in rows], schema=COUNT_SCHEMA)

    def _unit(self, unit: WorkUnit, counts: Counter[tuple[str, str, str]]) -> None:
        plan = self.plans[unit.source]
        sinks = _Sinks(self.fs)
        name = f"{unit.source:03d}-{unit.file:08d}-{unit.first_group:06d}"
        first: dict[str, int] = {}
        seen: set[bytes] = set()
        try:
            for row, docs in plan.documents(unit, self.data.batch_size,
                                            cluster_size=bool(self.data.rehydrate)):
                keys = doc_key(unit.source, unit.file,
                               np.arange(row, row + docs.num_rows, dtype=np.int64))
                kept = self._batch(docs, counts, seen)
                if not len(kept["keep"]):
                    continue
                self._write(kept, keys, unit.source, name, first, sinks, counts)
        finally:
            sinks.close()

    def _batch(self, docs: pa.Table, counts: Counter[tuple[str, str, str]],
               seen: set[bytes]) -> dict[str, Any]:
        """Tag, filter, count; then hash, drop the unit's own repeats, and MinHash and tokenize
        only what is left (``seen``: the exact hashes of the unit's earlier documents)."""
        texts = docs.column("text").combine_chunks()
        long = np.zeros(docs.num_rows, dtype=bool)
        if self.cut is not None:  # before LID and the regexes: they cost per byte
            long = pc.greater(pc.utf8_length(texts), self.cut).to_numpy(zero_copy_only=False)
            if long.any():
                texts = pc.if_else(pa.array(long), "", texts)
                docs = docs.set_column(0, "text", texts)
        docs = self.tagger(docs)
        langs = docs.column("lang").to_pylist()
        # the whole batch's whitespace pass only when a filter reads it; else the dedup
        # normalisation makes it for the kept documents alone
        collapsed = collapse_whitespace(texts) if self.filter.reads_collapsed else None
        quality = self.filter.reasons(texts, langs, collapsed)
        quality = ["max_chars" if c else q for q, c in zip(quality, long, strict=True)]
        drops = [d or q for d, q in zip(docs.column("drop").to_pylist(), quality, strict=True)]
        copies = np.ones(docs.num_rows, dtype=np.int32)
        if self.data.rehydrate and CLUSTER_SIZE in docs.column_names:
            copies = rehydration_copies(docs.column(CLUSTER_SIZE).to_numpy(), self.data.rehydrate)
            drops = [d or ("rehydration" if c == 0 else "") for d, c in
                     zip(drops, copies, strict=True)]
        run = self.lang_index
        bucket = [t if t in run else "other" for t in langs]
        labels, lids = docs.column("label").to_pylist(), docs.column("lid").to_pylist()
        bad = docs.column("bad_utf8").to_numpy()
        for i, b in enumerate(bucket):
            counts["in", b, ""] += 1
            if drops[i]:
                counts["drop", b, drops[i]] += 1
            if quality[i]:
                counts["quality", b, quality[i]] += 1
            if bad[i]:
                counts["bad_docs", b, ""] += 1
                counts["bad_chars", b, ""] += int(bad[i])
            if labels[i] and lids[i]:
                counts["confusion", labels[i], lids[i]] += 1
        keep = np.flatnonzero([not d for d in drops])
        out: dict[str, Any] = {"keep": keep}
        if not len(keep):
            return out
        sub_texts = _rows(texts, keep)
        if self.dedup:
            normalized = normalize(sub_texts, None if collapsed is None
                                   else _rows(collapsed, keep))
            if self.data.dedup.exact:
                digest = exact_hashes(sub_texts, normalized)
                fresh = self._first_in_unit(digest, [langs[i] for i in keep], seen, counts)
                if not fresh.all():
                    mask = pa.array(fresh)
                    keep, sub_texts = keep[fresh], sub_texts.filter(mask)
                    normalized, digest = normalized.filter(mask), digest.filter(mask)
                    out["keep"] = keep
                    if not len(keep):
                        return out
                out["h"] = np.frombuffer(digest.buffers()[1], dtype="<u8",
                                         count=2 * len(digest),
                                         offset=16 * digest.offset).reshape(-1, 2)
            if self.minhash is not None:
                out["minhash"] = self.minhash.signatures(sub_texts, normalized)
        sub = _rows(docs, keep).set_column(docs.schema.get_field_index("drop"), "drop",
                                           pa.array([""] * len(keep), pa.string()))
        out["lang"] = [langs[i] for i in keep]
        main = Counter(out["lang"]).most_common(1)[0][0]
        out["ids"] = self.tokenize(sub, main).column("input_ids").combine_chunks()
        out["label"], out["lid"] = [labels[i] for i in keep], [lids[i] for i in keep]
        out["copies"] = copies[keep]
        return out

    def _first_in_unit(self, digest: pa.Array, langs: list[str], seen: set[bytes],
                       counts: Counter[tuple[str, str, str]]) -> np.ndarray:
        """Which documents no earlier document of the unit repeats (same hash and scope).

        A repeat is an exact duplicate whatever the other units hold: the unit's rows are in key
        order, so the earlier copy has the smaller key. It is dropped and counted here, before
        the MinHash, the tokenizer and the shuffle spend anything on it (a map-side combine;
        the shuffle still settles repeats across units). ``seen`` stops growing at
        :data:`_SEEN_LIMIT` hashes (memory stays bounded on a huge unit; later repeats are left
        to the shuffle).
        """
        by_language = self.data.dedup.scope == "language"
        fresh = np.ones(len(langs), dtype=bool)
        for i, (h, lang) in enumerate(zip(digest.to_pylist(), langs, strict=True)):
            key = (lang.encode() + h) if by_language else h
            if key in seen:
                fresh[i] = False
                counts["drop", lang, EXACT_DUPLICATE] += 1
            elif len(seen) < _SEEN_LIMIT:
                seen.add(key)
        return fresh

    def _write(self, kept: dict[str, Any], keys: np.ndarray, source: int, name: str,
               first: dict[str, int], sinks: _Sinks, counts: Counter[tuple[str, str, str]]) \
            -> None:
        keep, ids = kept["keep"], kept["ids"]
        k = keys[keep]
        copies = kept["copies"]
        ntok = (pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64) + 1) \
            * copies
        langs = np.array(kept["lang"])
        for lang in dict.fromkeys(kept["lang"]):
            mask = langs == lang
            m = pa.array(mask)
            first.setdefault(lang, int(k[mask][0]))
            table = pa.Table.from_arrays([
                pa.array(k[mask]), ids.filter(m),
                pa.array(np.full(int(mask.sum()), source, dtype=np.int16)),
                pa.array(kept["label"], pa.string()).filter(m),
                pa.array(kept["lid"], pa.string()).filter(m),
                pa.array(copies[mask], pa.int32())], schema=DOCS_SCHEMA)
            sinks.write(f"{self.root}/docs/{lang}/{first[lang]:020d}.parquet", table)
            counts["tokens", lang, ""] += int(ntok[mask].sum())
        if not self.dedup:
            return
        lang_ids = np.array([self.lang_index[t] for t in kept["lang"]], dtype=np.int32)
        scope = lang_ids if self.data.dedup.scope == "language" else np.zeros_like(lang_ids)
        if "h" in kept:
            h1, h2 = kept["h"][:, 0], kept["h"][:, 1]
        else:  # no exact dedup: every document its own group, routed by its key
            h1, h2 = k.astype(np.uint64), np.zeros(len(k), dtype=np.uint64)
        columns = [pa.array(scope), pa.array(h1), pa.array(h2), pa.array(k),
                   pa.array(lang_ids), pa.array(ntok)]
        if "minhash" in kept:
            perm = self.data.dedup.num_perm
            columns.append(pa.FixedSizeListArray.from_arrays(kept["minhash"].flatten(), perm))
        table = pa.Table.from_arrays(columns, schema=self.exact_schema)
        part = (h1 % np.uint64(self.partitions)).astype(np.int64)
        for p in np.unique(part):
            sinks.write(f"{self.root}/exact/{int(p):05d}/{name}.parquet",
                        table.filter(pa.array(part == p)))
