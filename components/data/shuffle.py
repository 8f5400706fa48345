"""Distributed dedup: the reduce steps of the shuffles the unit workers started.

Each step is a Ray task over one partition of rows in the stage's work folder, reading and
writing through fsspec, returning counts: nothing but counts comes back to the driver.

1. :func:`exact_reduce` (one task per hash partition): the documents sharing a normalised-text
   hash within a scope keep the one with the smallest stable key; the rest are exact duplicates
   (``drop/<lang>/x<partition>``). The survivors' MinHash bands are routed on to the LSH
   partitions (``bands/<partition>/``) — near dedup only looks at exact-unique documents.
2. :func:`bucket_reduce` (one task per band partition): documents sharing a band bucket
   become star edges (``edges/<scope>/``) with their members' sizes (``nodes/<scope>/``).
3. :func:`cluster_reduce` (one task per scope, in parallel): connected components of the
   edges; every member but the smallest key is a near duplicate (``drop/<lang>/n<scope>``).

Removal is the packer's: it skips the keys under ``drop/<lang>/``. The arithmetic is in
:mod:`components.data.lsh`; datatrove's MinHash steps and NeMo Curator's LSH → connected
components pipeline are the models.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.data.dedup import EXACT_DUPLICATE
from components.data.lsh import band_hashes, bucket_edges, connected_components, first_occurrences

__all__ = ["bucket_reduce", "cluster_reduce", "exact_reduce", "list_parquet", "read_all"]

Counts = list[tuple[str, str, str, int]]
_ROW_GROUP = 65536  # sorted drop files: row-group statistics let the packer read one range
_BAND_SCHEMA = pa.schema([("scope", pa.int32()), ("band", pa.int32()), ("bhash", pa.uint64()),
                          ("key", pa.int64()), ("lang", pa.int32()), ("ntok", pa.int64())])
_NODE_SCHEMA = pa.schema([("key", pa.int64()), ("lang", pa.int32()), ("ntok", pa.int64())])


def list_parquet(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The parquet files under ``folder``, sorted (none when it does not exist)."""
    if not fs.exists(folder):
        return []
    return sorted(f for f in fs.find(folder) if f.endswith(".parquet"))


def read_all(fs: fsspec.AbstractFileSystem, files: list[str], schema: pa.Schema) -> pa.Table:
    """One table of ``files`` (an empty one of ``schema`` when there are none)."""
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _write(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, row_group_size=_ROW_GROUP)


def _drops(fs: fsspec.AbstractFileSystem, root: str, name: str, reason: str,
           languages: list[str], keys: np.ndarray, langs: np.ndarray,
           ntok: np.ndarray) -> Counts:
    """Write each language's dropped keys, sorted, and count them (documents and tokens)."""
    out: Counts = []
    for lang_id in np.unique(langs):
        mask = langs == lang_id
        lang = languages[int(lang_id)]
        _write(fs, f"{root}/drop/{lang}/{name}.parquet",
               pa.table({"key": pa.array(np.sort(keys[mask]))}))
        out.append(("drop", lang, reason, int(mask.sum())))
        out.append(("dup_tokens", lang, reason, int(ntok[mask].sum())))
    return out


def exact_reduce(work: str, storage_options: dict[str, Any], partition: int,
                 languages: list[str], exact: bool, lsh: tuple[int, int] | None,
                 band_partitions: int, seed: int) -> Counts:
    """Step 1 on hash partition ``partition``."""
    fs, root = fsspec.core.url_to_fs(work, **storage_options)
    root = root.rstrip("/")
    files = list_parquet(fs, f"{root}/exact/{partition:05d}")
    if not files:
        return []
    table = read_all(fs, files, pa.schema([]))
    col = {n: table.column(n).to_numpy() for n in ("scope", "h1", "h2", "key", "lang", "ntok")}
    keep = (first_occurrences(col["scope"], col["h1"], col["h2"], col["key"]) if exact
            else np.ones(table.num_rows, dtype=bool))
    counts = _drops(fs, root, f"x{partition:05d}", EXACT_DUPLICATE, languages,
                    col["key"][~keep], col["lang"][~keep], col["ntok"][~keep])
    if lsh is None or not keep.any():
        return counts
    bands, rows = lsh
    survivors = table.filter(pa.array(keep))
    sig = survivors.column("minhash").combine_chunks().flatten().to_numpy()
    hashes = band_hashes(sig.reshape(survivors.num_rows, -1), bands, rows, seed)
    n = survivors.num_rows
    band_rows = pa.table({
        "scope": np.repeat(col["scope"][keep], bands), "band": np.tile(
            np.arange(bands, dtype=np.int32), n), "bhash": hashes.reshape(-1),
        "key": np.repeat(col["key"][keep], bands), "lang": np.repeat(col["lang"][keep], bands),
        "ntok": np.repeat(col["ntok"][keep], bands)}, schema=_BAND_SCHEMA)
    route = (band_rows.column("bhash").to_numpy() % np.uint64(band_partitions)).astype(np.int64)
    for q in np.unique(route):
        _write(fs, f"{root}/bands/{int(q):05d}/x{partition:05d}.parquet",
               band_rows.filter(pa.array(route == q)))
    return counts


def bucket_reduce(work: str, storage_options: dict[str, Any], partition: int) -> list[int]:
    """Step 2 on band partition ``partition``; returns the scopes that got edges."""
    fs, root = fsspec.core.url_to_fs(work, **storage_options)
    root = root.rstrip("/")
    table = read_all(fs, list_parquet(fs, f"{root}/bands/{partition:05d}"), _BAND_SCHEMA)
    scopes: list[int] = []
    col = {n: table.column(n).to_numpy() for n in _BAND_SCHEMA.names}
    for scope in np.unique(col["scope"]):
        mask = col["scope"] == scope
        u, v = bucket_edges(col["scope"][mask], col["band"][mask], col["bhash"][mask],
                            col["key"][mask])
        if not len(u):
            continue
        scopes.append(int(scope))
        members = np.isin(col["key"], np.concatenate([u, v])) & mask
        nodes = pa.table({"key": col["key"][members], "lang": col["lang"][members],
                          "ntok": col["ntok"][members]}, schema=_NODE_SCHEMA)
        _write(fs, f"{root}/edges/{int(scope)}/q{partition:05d}.parquet",
               pa.table({"u": u, "v": v}))
        _write(fs, f"{root}/nodes/{int(scope)}/q{partition:05d}.parquet", nodes)
    return scopes


def cluster_reduce(work: str, storage_options: dict[str, Any], scope: int,
                   languages: list[str]) -> Counts:
    """Step 3 for one scope: clusters, and every member but the first is a near duplicate."""
    fs, root = fsspec.core.url_to_fs(work, **storage_options)
    root = root.rstrip("/")
    edges = read_all(fs, list_parquet(fs, f"{root}/edges/{scope}"), pa.schema([]))
    nodes = read_all(fs, list_parquet(fs, f"{root}/nodes/{scope}"), _NODE_SCHEMA)
    keys, labels = connected_components(edges.column("u").to_numpy(),
                                        edges.column("v").to_numpy())
    dup = keys[labels != keys]
    node_keys, first = np.unique(nodes.column("key").to_numpy(), return_index=True)
    at = np.searchsorted(node_keys, dup)
    langs = nodes.column("lang").to_numpy()[first][at]
    ntok = nodes.column("ntok").to_numpy()[first][at]
    return _drops(fs, root, f"n{scope:05d}", "near_duplicate", languages, dup, langs, ntok)
