"""The data stage end to end, distributed: the driver plans and counts, workers do the rest.

1. **Map** (:mod:`components.data.docops`, a Ray Data actor pool over work units): read, drop
   over-long documents, language ID, quality filters, hashes, MinHash, tokenize; kept tokens go
   to ``_work/docs/<lang>/`` and dedup rows to their shuffle partition, straight from workers.
   The per-unit counts are summed by Ray tasks over the map's output blocks (the driver
   holds their references, never their rows): the driver receives the totals.
2. **Dedup** (:mod:`components.data.shuffle`, Ray tasks): exact first occurrences per hash
   partition, then MinHash band buckets, then duplicate clusters per scope.
3. **Mix**: planned in the driver from the per-language token totals (counts only).
4. **Pack** (:mod:`components.data.packrun`, one Ray task per language): kept documents in
   stable-key order into shards written by the task into the stage folder.

Every process holds at most a batch of documents, a unit's drop keys or one shuffle partition;
the driver holds counts. Which duplicate survives and where a token goes follow the documents'
(source, file, row) keys, so the output is byte-identical at any number of actors, blocks,
partitions or nodes. Nothing here knows run configs or MLflow: the workflow calls
:func:`prepare_data` with the data section, the languages and a tokenizer.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from components.config import DataConfig
from components.data.dedup import lsh_params
from components.data.docops import UnitWorker
from components.data.errors import DataError
from components.data.mix import plan_mix
from components.data.pack import LanguageQuota
from components.data.packrun import pack_language
from components.data.readers import resolve_source
from components.data.result import DataResult
from components.data.shuffle import bucket_reduce, cluster_reduce, exact_reduce
from components.data.sources import SourceFiles
from components.data.tokenize import load_tokenizer

__all__ = ["DataResult", "prepare_data"]

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
WORK_DIR = "_work"
UNUSED_WARNING = 0.10  # share of kept tokens in no shard above which the stage warns
_SHARD_BYTES = 64 * 2**20
_BLOCK_BYTES = 8 * 2**20  # a parquet file above this is split into several work units
_PARTITION_BYTES = 512 * 2**20  # input bytes per dedup shuffle partition
_ACTOR_CPUS = 0.5  # per unit worker: the rest of its CPU is left to the count-summing task
# per reduce, sum or pack task: each is one Python thread, and on a small machine fewer
# processes at once start sooner (the four packers on 2 CPUs spent seconds starting workers)
_TASK_CPUS = 1.0
_SUM_FAN_IN = 256  # count blocks one summing task takes: a tree of sums past that


def _pool(requested: int | None, units: int) -> tuple[int, int]:
    """(actors, tokenizer threads per actor) of the unit workers.

    One single-threaded actor per CPU by default: the filters, hashes and language ID are one
    Python thread, so two one-thread actors on 2 cores beat one two-thread actor. No more
    actors than work units (each is a fresh process importing Ray Data: seconds), never more
    than CPUs (half-CPU actors leave room for the task summing their counts).
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if requested and requested > cpus:
        log.warning("data.actors=%d is more than the cluster's %d CPUs; using %d",
                    requested, cpus, cpus)
    actors = max(1, min(requested or units, cpus, units))
    return actors, max(1, cpus // actors)


def _context(progress: bool) -> Any:
    """The stage's own Ray Data settings, scoped to its datasets (the driver's is untouched)."""
    import ray.data

    ctx = ray.data.DataContext.get_current().copy()
    ctx.enable_progress_bars = progress
    return ctx


class _Driver:
    """What the driver receives, with its pickled size counted (the no-token-data check)."""

    def __init__(self) -> None:
        self.received = 0

    def get(self, refs: Any) -> Any:
        import ray

        value = ray.get(refs)
        self.received += len(pickle.dumps(value))
        return value

    def take(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.received += len(pickle.dumps(rows))
        return rows


def _plans(data: DataConfig, languages: list[str], run_dir: str | None) -> list[SourceFiles]:
    plans = [resolve_source(s, languages, run_dir) for s in data.sources]
    covered = {t for p in plans for t in p.languages}
    if all(p.reader.finds_languages for p in plans):
        missing = [t for t in languages if t not in covered]
        if missing:
            looked = "; ".join(
                f"{p.source.format} source {p.source.name!r} looked for "
                f"{', '.join(p.reader.layout_tag(t) for t in missing)} and has "
                f"{', '.join(p.reader.available(p.path, p.fs) or []) or 'nothing'}"
                for p in plans)
            raise DataError(f"no source has data for {', '.join(missing)} ({looked})")
    return plans


def _map(data: DataConfig, languages: list[str], plans: list[SourceFiles], tok_json: str,
         work: str, opts: dict[str, Any], partitions: int, seed: int, progress: bool,
         driver: _Driver) -> dict[tuple[str, str, str], int]:
    """Step 1: the unit workers; returns the summed counts."""
    import ray.data

    units = [asdict(u) for i, p in enumerate(plans) for u in p.units(i, _BLOCK_BYTES)]
    actors, threads = _pool(data.actors, len(units))
    with ray.data.DataContext.current(_context(progress)):
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        counts = ds.map_batches(UnitWorker, fn_constructor_kwargs={
            "data": data, "languages": languages, "plans": plans, "tokenizer_json": tok_json,
            "work": work, "storage_options": opts, "partitions": partitions, "seed": seed,
            "tokenizer_threads": threads}, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=_ACTOR_CPUS)
        total = _total(ref for bundle in counts.iter_internal_ref_bundles()
                       for ref in bundle.block_refs)
    return {(r["kind"], r["lang"], r["detail"]): r["n"] for r in driver.get(total)}


def _sum_counts(*tables: pa.Table) -> pa.Table:
    """One table of counts per (kind, lang, detail), sorted: the sum of ``tables``."""
    summed = pa.concat_tables(tables).group_by(["kind", "lang", "detail"]).aggregate(
        [("n", "sum")])
    return summed.rename_columns(["kind", "lang", "detail", "n"]).sort_by(
        [("kind", "ascending"), ("lang", "ascending"), ("detail", "ascending")])


def _total(blocks: Iterable[Any]) -> Any:
    """A task returning the summed counts of the map's output ``blocks`` (object refs, as the
    map yields them), as rows.

    A running sum: every :data:`_SUM_FAN_IN` blocks fold into one task, and the first block at
    once, so the summing worker starts while the map still runs (a Ray Data group-by waited
    for its hash-shuffle aggregator actors after the map: seconds per run). The counts have a
    few hundred distinct keys whatever the corpus size; the warm worker then runs the dedup.
    """
    import ray

    task = ray.remote(_sum_counts).options(num_cpus=_TASK_CPUS)
    pending: list[Any] = []
    folded = False
    for ref in blocks:
        pending.append(ref)
        if not folded or len(pending) == _SUM_FAN_IN:
            pending, folded = [task.remote(*pending)], True
    return ray.remote(_count_rows).options(num_cpus=_TASK_CPUS).remote(*pending)


def _count_rows(*tables: pa.Table) -> list[dict[str, Any]]:
    """The last sum of :func:`_total`, as the rows the driver reads."""
    return _sum_counts(*tables).to_pylist()


def _dedup(data: DataConfig, languages: list[str], work: str, opts: dict[str, Any],
           partitions: int, seed: int, driver: _Driver) -> list[tuple[str, str, str, int]]:
    """Step 2: the shuffles' reduce tasks; returns the duplicate counts."""
    import ray

    if not (data.dedup.exact or data.dedup.minhash):
        return []
    task = {"num_cpus": _TASK_CPUS, "scheduling_strategy": "SPREAD"}
    lsh = lsh_params(data.dedup.minhash_threshold, data.dedup.num_perm) \
        if data.dedup.minhash else None
    exact = ray.remote(exact_reduce).options(**task)
    counts = [c for part in driver.get([
        exact.remote(work, opts, p, languages, data.dedup.exact, lsh, partitions, seed)
        for p in range(partitions)]) for c in part]
    if lsh is None:
        return counts
    buckets = ray.remote(bucket_reduce).options(**task)
    scopes = sorted({s for part in driver.get([buckets.remote(work, opts, q)
                                              for q in range(partitions)]) for s in part})
    clusters = ray.remote(cluster_reduce).options(**task)
    return counts + [c for part in driver.get([clusters.remote(work, opts, s, languages)
                                               for s in scopes]) for c in part]


def _agreement(backend: str, confusion: dict[str, Counter[str]],
               languages: list[str]) -> dict[str, float]:
    """Share of each label's documents LID agrees on (py3langid cannot tell scripts apart:
    a same-language prediction counts as agreement)."""
    from components.data.lid import same_language

    def agrees(label: str, pred: str) -> bool:
        return same_language(label, pred) if backend == "py3langid" else pred == label

    return {label: sum(n for p, n in c.items() if agrees(label, p)) / sum(c.values())
            for label, c in confusion.items() if label in languages and c}


def prepare_data(data: DataConfig, languages: Sequence[str], original: Sequence[str],
                 tokenizer_dir: str | Path, out_dir: str | Path, *, run_dir: str | None = None,
                 seed: int = 0, progress: bool = True,
                 storage_options: dict[str, Any] | None = None,
                 final_dir: str | None = None) -> DataResult:
    """Read, tag, filter, dedup, tokenize, mix and pack ``data.sources`` for ``languages``.

    Writes ``out_dir/train/*.parquet`` and ``out_dir/validation/*.parquet`` (columns
    ``input_ids`` list<int32> of exactly ``seq_len``, ``lang``, ``source``) and
    ``out_dir/stats.json``, which names ``final_dir`` (where the caller will move ``out_dir``)
    when given. Raises :class:`DataError` on input a user can fix.
    """
    languages = list(dict.fromkeys(languages))
    if not data.sources:
        raise DataError("data.sources is empty: name at least one corpus")
    tok = load_tokenizer(tokenizer_dir)  # before any Ray work: a bad tokenizer fails fast
    plans = _plans(data, languages, run_dir)
    opts = storage_options or {}
    fs, root = fsspec.core.url_to_fs(str(out_dir), **opts)
    root = root.rstrip("/")
    work = fs.unstrip_protocol(f"{root}/{WORK_DIR}")
    partitions = max(1, min(512, -(-sum(p.size() for p in plans) // _PARTITION_BYTES)))
    driver = _Driver()
    started = time.perf_counter()
    try:
        counts = _map(data, languages, plans, tok.json, work, opts, partitions, seed,
                      progress, driver)
        mapped = time.perf_counter()
        dups = _dedup(data, languages, work, opts, partitions, seed, driver)
        deduped = time.perf_counter()
        result = _pack(data, languages, original, counts, dups, work, fs.unstrip_protocol(root),
                       opts, tok.eos_id, driver)
        log.info("data: map %.1fs, dedup %.1fs (%d partitions), pack %.1fs", mapped - started,
                 deduped - mapped, partitions, time.perf_counter() - deduped)
    finally:
        if fs.exists(f"{root}/{WORK_DIR}"):
            fs.rm(f"{root}/{WORK_DIR}", recursive=True)
    if final_dir is not None:
        result["files"] = [f"{final_dir.rstrip('/')}{f[len(root):]}" if f.startswith(root)
                           else f for f in result["files"]]
    result["driver_bytes_received"] = driver.received
    stats = DataResult(out_dir=final_dir or str(out_dir), seq_len=data.seq_len,
                       languages=languages, dedup_scope=data.dedup.scope,
                       mix_mode=data.mix.mode, lid_backend=data.lid.backend, **result)
    with fs.open(f"{root}/{STATS_FILE}", "w") as handle:
        handle.write(json.dumps(stats.to_dict(), indent=1, sort_keys=True))
    return stats


def _pack(data: DataConfig, languages: list[str], original: Sequence[str],
          counts: dict[tuple[str, str, str], int], dups: list[tuple[str, str, str, int]],
          work: str, out: str, opts: dict[str, Any], eos: int, driver: _Driver) \
        -> dict[str, Any]:
    """Steps 3 and 4: plan the mix from the kept tokens, pack each language in its own task."""
    import ray

    by: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for (kind, lang, detail), n in counts.items():
        by[kind][lang][detail] += n
    for kind, lang, detail, n in dups:
        by[kind][lang][detail] += n
    docs_in = {t: sum(c.values()) for t, c in by["in"].items()}
    dropped = {t: dict(c) for t, c in by["drop"].items()}
    docs_out = {t: docs_in.get(t, 0) - sum(dropped.get(t, {}).values()) for t in languages}
    kept = {t: by["tokens"][t][""] - sum(by["dup_tokens"][t].values()) for t in languages}
    empty = [t for t in languages if docs_out[t] <= 0]
    if empty:
        detail = "; ".join(f"{t}: {docs_in.get(t, 0)} documents read, dropped "
                           f"{dropped.get(t) or 'none'}" for t in empty)
        raise DataError(f"no documents left for {', '.join(empty)} after language ID, "
                        f"filters and dedup ({detail}); loosen data.filters / data.lid or "
                        "add data")
    seq_len = data.seq_len
    quotas: dict[str, LanguageQuota] = {}
    available: dict[str, int] = {}
    for lang in languages:
        total = kept[lang] // seq_len
        n_val = max(1, round(total * data.validation_fraction)) \
            if data.validation_fraction > 0 and total > 1 else 0
        quotas[lang] = LanguageQuota(total=total, train=0, validation=n_val)
        available[lang] = (total - n_val) * seq_len
    plan = plan_mix(available, languages, original, data.mix, seq_len)
    for lang, quota in quotas.items():
        quota.train = min(plan.sequences.get(lang, 0), quota.total - quota.validation)
    task = ray.remote(pack_language).options(num_cpus=_TASK_CPUS, scheduling_strategy="SPREAD")
    names = [s.name for s in data.sources]
    packed = driver.get([task.remote(work, out, opts, lang, quotas[lang], seq_len, eos,
                                     max(1, _SHARD_BYTES // (4 * seq_len)), names)
                         for lang in languages])
    for p in packed:
        if p["tokens"] != kept[p["lang"]]:  # the two counts come from different steps
            raise RuntimeError(f"data stage: {p['lang']} packed {p['tokens']} tokens but the "
                               f"dedup counts left {kept[p['lang']]}")
    train = {lang: q.train * seq_len for lang, q in quotas.items()}
    validation = {lang: q.validation * seq_len for lang, q in quotas.items()}
    total_train = sum(train.values())
    unused = sum(kept.values()) - total_train - sum(validation.values())
    fraction = unused / max(1, sum(kept.values()))
    warnings = []
    if fraction > UNUSED_WARNING:
        warnings.append(f"{fraction:.0%} of the kept tokens ({unused}) went into no shard: the "
                        "mix is capped by the scarcest language; data.mix.mode: all trains on "
                        "every kept token")
        log.warning("data: %s", warnings[-1])
    confusion_kept: dict[str, Counter[str]] = defaultdict(Counter)
    for p in packed:
        for label, lid, n in p["confusion"]:
            confusion_kept[label][lid] += n
    return {
        "documents_in": docs_in, "documents_out": docs_out, "dropped": dropped,
        "tokens_kept": kept, "tokens_requested": dict(plan.requested), "tokens_train": train,
        "tokens_validation": validation,
        "partial_tokens_dropped": {p["lang"]: p["leftover"] for p in packed},
        "share_requested": dict(plan.shares),
        "share_realized": {t: (n / total_train if total_train else 0.0)
                           for t, n in train.items()},
        "bad_utf8_documents": {t: c[""] for t, c in by["bad_docs"].items()},
        "bad_utf8_replacements": {t: c[""] for t, c in by["bad_chars"].items()},
        "lid_agreement": _agreement(data.lid.backend, by["confusion"], languages),
        "lid_confusion": {k: dict(v) for k, v in by["confusion"].items()},
        "lid_agreement_kept": _agreement(data.lid.backend, confusion_kept, languages),
        "lid_confusion_kept": {k: dict(v) for k, v in confusion_kept.items()},
        "quality_flags": {t: dict(c) for t, c in by["quality"].items()},
        "worker_nodes": len(by["node"]),
        "tokens_unused": unused, "tokens_unused_fraction": fraction, "warnings": warnings,
        "files": [f for p in packed for f in p["files"]],
    }
