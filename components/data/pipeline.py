"""The data stage end to end: read → language ID → filters → hashes → tokenize (Ray Data), then
dedup, mix and pack (driver), written as parquet shards with their statistics.

Ray Data does the per-document work in parallel and streams the result back in corpus order
(``preserve_order``), because two decisions need one global, ordered view: a duplicate is every
occurrence after the first, and a language's token stream is its documents in corpus order. The
driver therefore makes two passes: the first drops duplicates and spools each language's kept
token lists to a local Arrow file (so memory follows one batch, not the corpus) while counting
tokens; once every language's total is known the mix is planned, and the second pass packs each
language's spool into fixed-length sequences (training head, validation tail).

Nothing here knows about run configs or MLflow: :func:`prepare_data` takes the data section, the
languages and a tokenizer, so the workflow can call it for the continued-pre-training data and,
on the synthetic world, for the base's pre-training data of the original languages.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config import DataConfig
from components.data.dedup import MinHasher, NearDuplicateIndex, exact_hashes, normalize
from components.data.errors import DataError
from components.data.filters import QualityFilter
from components.data.lid import LanguageTagger
from components.data.mix import plan_mix
from components.data.pack import LanguageQuota, SequencePacker, ShardWriter, with_eos
from components.data.readers import resolve_source
from components.data.textops import collapse_whitespace
from components.data.tokenize import TokenizeBatch, load_tokenizer

__all__ = ["DataResult", "prepare_data"]

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
EXACT_DUP, NEAR_DUP = "exact_duplicate", "near_duplicate"
_SHARD_BYTES = 64 * 2**20
_BLOCK_BYTES = 8 * 2**20


@dataclass
class DataResult:
    """What the stage wrote and why: every count the statistics table shows."""

    out_dir: str
    seq_len: int
    languages: list[str]
    documents_in: dict[str, int]
    documents_out: dict[str, int]
    dropped: dict[str, dict[str, int]]  # language → reason → documents
    tokens_kept: dict[str, int]  # tokens (EOS included) of kept documents
    tokens_requested: dict[str, int]
    tokens_train: dict[str, int]
    tokens_validation: dict[str, int]
    partial_tokens_dropped: dict[str, int]
    share_requested: dict[str, float]
    share_realized: dict[str, float]
    bad_utf8_documents: dict[str, int]
    bad_utf8_replacements: dict[str, int]
    lid_backend: str
    lid_agreement: dict[str, float]  # dataset label → share of its documents LID agrees on
    lid_confusion: dict[str, dict[str, int]]  # dataset label → predicted tag → documents
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``data/<what>/<lang>``."""
        out: dict[str, float] = {}
        for name in ("documents_in", "documents_out", "tokens_kept", "tokens_requested",
                     "tokens_train", "tokens_validation", "partial_tokens_dropped",
                     "share_requested", "share_realized", "bad_utf8_replacements",
                     "lid_agreement"):
            for lang, value in getattr(self, name).items():
                out[f"data/{name}/{lang}"] = float(value)
        for lang, reasons in self.dropped.items():
            for reason, n in reasons.items():
                out[f"data/dropped/{reason}/{lang}"] = float(n)
        return out

    def table(self) -> dict[str, list[Any]]:
        """One row per language (for ``mlflow.log_table`` and the CLI)."""
        reasons = sorted({r for d in self.dropped.values() for r in d})
        rows: dict[str, list[Any]] = defaultdict(list)
        for lang in self.languages:
            rows["lang"].append(lang)
            rows["docs_in"].append(self.documents_in.get(lang, 0))
            for reason in reasons:
                rows[f"dropped_{reason}"].append(self.dropped.get(lang, {}).get(reason, 0))
            rows["docs_out"].append(self.documents_out.get(lang, 0))
            rows["tokens_requested"].append(self.tokens_requested.get(lang, 0))
            rows["tokens_train"].append(self.tokens_train.get(lang, 0))
            rows["tokens_validation"].append(self.tokens_validation.get(lang, 0))
            rows["share_requested"].append(round(self.share_requested.get(lang, 0.0), 4))
            rows["share_realized"].append(round(self.share_realized.get(lang, 0.0), 4))
            rows["lid_agreement"].append(self.lid_agreement.get(lang))
        return dict(rows)


# ----------------------------------------------------------------------------- Ray operator


class DocumentOps:
    """Every per-document step after reading, as one Ray Data class UDF: language ID, quality
    filters, dedup hashes, tokenization.

    One operator instead of four: each actor loads the LID model and the tokenizer once, a batch
    crosses the object store once, and on a small machine one actor pool leaves CPUs to the read
    tasks (four pools that each reserve a CPU starve them and the pipeline never starts).
    """

    def __init__(self, data: DataConfig, languages: Sequence[str], tokenizer_json: str,
                 seed: int, tokenizer_threads: int | None = None) -> None:
        lid = data.lid
        self.tagger = LanguageTagger(lid.backend, languages, lid.mode, lid.threshold,
                                     dict(lid.thresholds), lid.model_path)
        self.filter = QualityFilter(data.filters, languages)
        self.exact = data.dedup.exact
        self.minhash = (MinHasher(data.dedup.num_perm, seed) if data.dedup.minhash else None)
        self.tokenize = TokenizeBatch(tokenizer_json, tokenizer_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = self.tagger(batch)
        texts = batch.column("text").combine_chunks()
        collapsed = collapse_whitespace(texts)  # one regex pass for the filters and the hashes
        drops = batch.column("drop").to_pylist()
        reasons = self.filter.reasons(texts, batch.column("lang").to_pylist(), collapsed)
        merged = [d or r for d, r in zip(drops, reasons, strict=True)]
        batch = batch.set_column(batch.schema.get_field_index("drop"), "drop",
                                 pa.array(merged, pa.string()))
        if self.exact or self.minhash is not None:
            normalized = normalize(texts, collapsed)
        if self.exact:
            batch = batch.append_column("hash", exact_hashes(texts, normalized))
        if self.minhash is not None:
            batch = batch.append_column("minhash", self.minhash.signatures(texts, normalized))
        return self.tokenize(batch)


# ----------------------------------------------------------------------------- the stage


def _pool(requested: int | None, input_bytes: int) -> tuple[int, int]:
    """(actors, tokenizer threads per actor) of the document operator.

    One single-threaded actor per CPU by default: the filters, hashes and language ID are one
    Python thread, so an actor whose encoder spreads over every core leaves all but one idle
    while it filters; two one-thread actors on 2 cores made the stage 23 % faster than one
    two-thread actor (``benchmarks/data_throughput.py``). But no more actors than the input
    has blocks: each actor is a fresh process that imports Ray Data (seconds), pure cost on a
    small corpus. Never more actors than CPUs (three half-CPU actors on 2 CPUs left the read
    tasks waiting forever).
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if requested and requested > cpus:
        log.warning("data.actors=%d is more than the cluster's %d CPUs; using %d",
                    requested, cpus, cpus)
    actors = min(requested or max(1, -(-input_bytes // _BLOCK_BYTES)), cpus)
    return actors, max(1, cpus // actors)


def _context(progress: bool) -> Any:
    """The stage's own Ray Data settings, scoped to its datasets (the driver's current context,
    which other code may use, is left as it was).

    Blocks of at most 8 MiB: the default 128 MiB made the whole synthetic corpus one block,
    so the document operator ran as one task and the driver saw nothing until it ended; small
    blocks stream to the ordered dedup pass while later ones are still being tokenized.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current().copy()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = _BLOCK_BYTES
    return ctx


def _dataset(data: DataConfig, languages: list[str], tokenizer_json: str, run_dir: str | None,
             seed: int, progress: bool) -> Any:
    import ray.data

    plans = [resolve_source(s, languages, run_dir) for s in data.sources]
    covered = {t for p in plans for t in p.languages}
    if data.sources and all(p.reader.finds_languages for p in plans):
        missing = [t for t in languages if t not in covered]
        if missing:
            raise DataError(f"no source has data for {', '.join(missing)} (sources: "
                            f"{', '.join(p.source.name for p in plans)})")
    actors, threads = _pool(data.actors, sum(p.size() for p in plans))
    with ray.data.DataContext.current(_context(progress)):
        parts = [p.read(data.batch_size) for p in plans]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        return ds.map_batches(DocumentOps, fn_constructor_kwargs={
            "data": data, "languages": languages, "tokenizer_json": tokenizer_json,
            "seed": seed, "tokenizer_threads": threads}, batch_size=data.batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0.5)


_SPOOL_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("source", pa.string())])


class _Spool:
    """Kept documents' token lists per language, appended in corpus order to local Arrow IPC
    files: written and memory-mapped back without encoding (parquet's encoder cost the driver
    a second per 100 MiB of text, for a file it reads once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sinks: dict[str, tuple[pa.OSFile, pa.ipc.RecordBatchFileWriter]] = {}

    def add(self, lang: str, ids: pa.Array, sources: pa.Array) -> None:
        if lang not in self.sinks:
            sink = pa.OSFile(str(self.root / f"{lang}.arrow"), "wb")
            self.sinks[lang] = (sink, pa.ipc.new_file(sink, _SPOOL_SCHEMA))
        self.sinks[lang][1].write_batch(pa.record_batch([ids, sources], schema=_SPOOL_SCHEMA))

    def close(self) -> None:
        for sink, writer in self.sinks.values():
            if not sink.closed:
                writer.close()
                sink.close()

    def read(self, lang: str) -> pa.Table | None:
        """The language's spool, memory-mapped (pages come from the file, not the heap)."""
        path = self.root / f"{lang}.arrow"
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all() if path.exists() else None


class _Ledger:
    """The driver's ordered pass over the operator's batches: counts every document by language
    and reason, and drops each duplicate of a document kept earlier in corpus order.

    Counting is Arrow group-bys per batch; only the dedup decision walks documents one by one,
    and only those the workers kept."""

    def __init__(self, languages: list[str], near: NearDuplicateIndex | None) -> None:
        self.run = pa.array(languages, pa.string())
        self.near = near
        self.seen: set[bytes] = set()
        self.docs_in: Counter[str] = Counter()
        self.docs_out: Counter[str] = Counter()
        self.dropped: dict[str, Counter[str]] = defaultdict(Counter)
        self.bad_docs: Counter[str] = Counter()
        self.bad_chars: Counter[str] = Counter()
        self.confusion: dict[str, Counter[str]] = defaultdict(Counter)

    def _dedup(self, batch: pa.Table) -> pa.Array:
        """The batch's drop reasons with exact and near duplicates added."""
        reasons = batch.column("drop").to_pylist()
        hashes = batch.column("hash").to_pylist() if "hash" in batch.column_names else None
        sigs = batch.column("minhash") if "minhash" in batch.column_names else None
        for i in [i for i, r in enumerate(reasons) if not r]:
            if hashes is not None:
                if hashes[i] in self.seen:
                    reasons[i] = EXACT_DUP
                    continue
                self.seen.add(hashes[i])
            if self.near is not None and sigs is not None:
                signature = np.asarray(sigs[i].values.to_numpy(zero_copy_only=False))
                if self.near.check_and_add(signature):
                    reasons[i] = NEAR_DUP
        return pa.array(reasons, pa.string())

    def admit(self, batch: pa.Table) -> np.ndarray:
        """Count ``batch`` and return its keep mask."""
        lang = batch.column("lang")
        reason = self._dedup(batch)
        t = pa.table({
            "key": pc.if_else(pc.is_in(lang, value_set=self.run), lang, "other"),
            "reason": reason, "bad": batch.column("bad_utf8"),
            "label": batch.column("label"), "lid": batch.column("lid")})
        kept = pc.equal(reason, "")
        _add(self.docs_in, _counts(t, ["key"]))
        _add(self.docs_out, _counts(t.filter(kept), ["key"]))
        bad = t.filter(pc.greater(t.column("bad"), 0))
        for row in bad.group_by("key").aggregate([("bad", "sum"), ([], "count_all")]) \
                .to_pylist():
            self.bad_docs[row["key"]] += row["count_all"]
            self.bad_chars[row["key"]] += int(row["bad_sum"])
        for (key, why), n in _counts(t.filter(pc.invert(kept)), ["key", "reason"]).items():
            self.dropped[key][why] += n
        tagged = pc.and_(pc.not_equal(t.column("label"), ""), pc.not_equal(t.column("lid"), ""))
        for (label, lid), n in _counts(t.filter(tagged), ["label", "lid"]).items():
            self.confusion[label][lid] += n
        return kept.to_numpy(zero_copy_only=False)


def _counts(table: pa.Table, keys: list[str]) -> dict[Any, int]:
    """Rows per value of ``keys`` (a tuple key when there are several)."""
    out = {}
    for row in table.group_by(keys).aggregate([([], "count_all")]).to_pylist():
        out[row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)] = row["count_all"]
    return out


def _add(counter: Counter[str], counts: dict[Any, int]) -> None:
    for key, n in counts.items():
        counter[key] += n


def prepare_data(data: DataConfig, languages: Sequence[str], original: Sequence[str],
                 tokenizer_dir: str | Path, out_dir: str | Path, *, run_dir: str | None = None,
                 seed: int = 0, progress: bool = True,
                 storage_options: dict[str, Any] | None = None) -> DataResult:
    """Read, tag, filter, dedup, tokenize, mix and pack ``data.sources`` for ``languages``.

    Writes ``out_dir/train/*.parquet`` and ``out_dir/validation/*.parquet`` (columns
    ``input_ids`` list<int32> of exactly ``seq_len``, ``lang``, ``source``) and
    ``out_dir/stats.json``. Raises :class:`DataError` on input a user can fix.
    """
    languages = list(dict.fromkeys(languages))
    if not data.sources:
        raise DataError("data.sources is empty: name at least one corpus")
    tok = load_tokenizer(tokenizer_dir)  # before any Ray work: a bad tokenizer fails fast
    ds = _dataset(data, languages, tok.json, run_dir, seed, progress)

    near = (NearDuplicateIndex(data.dedup.num_perm, data.dedup.minhash_threshold)
            if data.dedup.minhash else None)
    ledger = _Ledger(languages, near)
    tokens_kept: Counter[str] = Counter()
    spool_dir = Path(tempfile.mkdtemp(prefix="deltamoe-data-"))
    spool = _Spool(spool_dir)
    try:
        for batch in ds.iter_batches(batch_size=data.batch_size, batch_format="pyarrow"):
            keep = ledger.admit(batch)
            if not keep.any():
                continue
            kept = batch.filter(pa.array(keep))
            ids = kept.column("input_ids").combine_chunks()
            lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
            kept_langs = np.array(kept.column("lang").to_pylist())
            for lang in np.unique(kept_langs):
                mask = kept_langs == lang
                spool.add(str(lang), ids.filter(pa.array(mask)),
                          kept.column("source").combine_chunks().filter(pa.array(mask)))
                tokens_kept[str(lang)] += int(lengths[mask].sum()) + int(mask.sum())  # + EOS
        spool.close()
        empty = [t for t in languages if ledger.docs_out[t] == 0]
        if empty:
            detail = "; ".join(f"{t}: {ledger.docs_in[t]} documents read, dropped "
                               f"{dict(ledger.dropped[t]) or 'none'}" for t in empty)
            raise DataError(f"no documents left for {', '.join(empty)} after language ID, "
                            f"filters and dedup ({detail}); loosen data.filters / data.lid or "
                            "add data")
        result = _pack(data, languages, original, spool, tokens_kept, out_dir, tok.eos_id,
                       storage_options or {})
    finally:
        spool.close()
        shutil.rmtree(spool_dir, ignore_errors=True)

    agreement = {label: counts[label] / sum(counts.values())
                 for label, counts in ledger.confusion.items() if label in languages}
    # py3langid cannot tell scripts apart: count same-language predictions as agreement
    if data.lid.backend == "py3langid":
        from components.data.lid import same_language

        agreement = {label: sum(n for pred, n in counts.items() if same_language(label, pred))
                     / sum(counts.values())
                     for label, counts in ledger.confusion.items() if label in languages}
    stats = DataResult(
        out_dir=str(out_dir), seq_len=data.seq_len, languages=languages,
        documents_in=dict(ledger.docs_in), documents_out=dict(ledger.docs_out),
        dropped={k: dict(v) for k, v in ledger.dropped.items()}, tokens_kept=dict(tokens_kept),
        bad_utf8_documents=dict(ledger.bad_docs),
        bad_utf8_replacements=dict(ledger.bad_chars),
        lid_backend=data.lid.backend, lid_agreement=agreement,
        lid_confusion={k: dict(v) for k, v in ledger.confusion.items()}, **result)
    fs, root = fsspec.core.url_to_fs(str(out_dir), **(storage_options or {}))
    with fs.open(f"{root.rstrip('/')}/{STATS_FILE}", "w") as handle:
        handle.write(json.dumps(stats.to_dict(), indent=1, sort_keys=True))
    return stats


def _pack(data: DataConfig, languages: list[str], original: Sequence[str], spool: _Spool,
          tokens_kept: Counter[str], out_dir: str | Path, eos: int,
          storage_options: dict[str, Any]) -> dict[str, Any]:
    """Plan the mix from the kept tokens, then pack each language's spool in corpus order."""
    seq_len = data.seq_len
    quotas: dict[str, LanguageQuota] = {}
    available: dict[str, int] = {}
    for lang in languages:
        total = tokens_kept[lang] // seq_len
        n_val = 0
        if data.validation_fraction > 0 and total > 1:
            n_val = max(1, round(total * data.validation_fraction))
        quotas[lang] = LanguageQuota(total=total, train=0, validation=n_val)
        available[lang] = (total - n_val) * seq_len
    plan = plan_mix(available, languages, original, data.mix, seq_len)
    for lang, quota in quotas.items():
        quota.train = min(plan.sequences.get(lang, 0), quota.total - quota.validation)
    fs, root = fsspec.core.url_to_fs(str(out_dir), **storage_options)
    writer = ShardWriter(fs, root, seq_len, rows_per_shard=max(1, _SHARD_BYTES // (4 * seq_len)))
    sources = sorted({s.name for s in data.sources})
    code = {name: i for i, name in enumerate(sources)}
    packer = SequencePacker(writer, seq_len, quotas, sources)
    for lang in languages:
        spooled = spool.read(lang)
        if spooled is None:
            continue
        for batch in spooled.to_batches(max_chunksize=4096):
            flat, starts = with_eos(batch.column("input_ids"), eos)
            doc_sources = np.array([code[s] for s in batch.column("source").to_pylist()])
            lengths = np.diff(np.append(starts, len(flat)))
            packer.add(lang, flat, np.repeat(doc_sources, lengths))
    writer.close()
    train = {lang: q.train * seq_len for lang, q in quotas.items()}
    total_train = sum(train.values())
    return {
        "tokens_requested": dict(plan.requested),
        "tokens_train": train,
        "tokens_validation": {lang: q.validation * seq_len for lang, q in quotas.items()},
        "partial_tokens_dropped": packer.leftover(),
        "share_requested": dict(plan.shares),
        "share_realized": {lang: (n / total_train if total_train else 0.0)
                           for lang, n in train.items()},
        "files": list(writer.files),
    }
