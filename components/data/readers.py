"""Readers: find each source's files per language and read them into one document schema.

Every source, whatever its layout, becomes Ray Data rows with the same columns, so the later
operators never look at formats: ``text`` (valid UTF-8, invalid bytes replaced), ``label`` (the
dataset's own canonical language tag, ``""`` when it does not say), ``source`` (the source name),
``bad_utf8`` (replacement characters introduced) and ``drop`` (``""`` while the document is kept,
else the reason it was dropped, so each drop is counted by the operator that decided it).

Layouts: FineWeb2 ``data/<tag>/train/*.parquet`` (per-document ``language`` + ``language_script``),
CulturaX ``<iso639-1>/*.parquet`` (the folder is the label), plain parquet or jsonl with a
configurable text column and an optional language column. Parquet is read with column
projection; jsonl is read as bytes and split here, because Arrow's JSON reader stops at the
first invalid UTF-8 byte and web text has them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from components.config import DataSource
from components.data.errors import DataError
from components.languages import UnknownLanguageError, canonical_tag, culturax_code, culturax_tag

__all__ = ["DOC_SCHEMA", "SourceFiles", "read_source", "repair_utf8", "resolve_source"]

DOC_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string()), ("source", pa.string()),
                        ("bad_utf8", pa.int32()), ("drop", pa.string())])
UNKNOWN_LANGUAGE = "unknown_language"
_REPLACEMENT = "\ufffd"


# fsspec ``info`` keys that change when a file's bytes do, most specific first
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "mtime", "LastModified",
                 "last_modified", "updated", "created")


@dataclass
class SourceFiles:
    """One source resolved to files: what to read and how to label what is read."""

    source: DataSource
    path: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    languages: list[str]  # canonical tags this source is read for
    columns: list[str] = field(default_factory=list)  # projected columns

    @cached_property
    def _infos(self) -> list[dict[str, Any]]:
        """The store's metadata of each file, asked once (a HEAD per file on object stores)."""
        return [self.fs.info(path) for path in self.files]

    def size(self) -> int:
        """Bytes of the source's files as stored (without reading them)."""
        return sum(int(info.get("size") or 0) for info in self._infos)

    def versions(self) -> list[list[Any]]:
        """``[file, size, version]`` per file without reading it: the store's content tag
        (S3/GCS ETag or MD5) where it keeps one, else its modification time. A corpus edited in
        place, even to the same size, gets new shards; an untouched one is reused."""
        out: list[list[Any]] = []
        for path, info in zip(self.files, self._infos, strict=True):
            version = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), None)
            out.append([path, info.get("size"), str(version)])
        return out


def _fs_for(source: DataSource, run_dir: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    path = source.path
    if "{run_dir}" in path:
        if run_dir is None:
            raise DataError(f"source {source.name!r}: path {path} uses {{run_dir}} but no run "
                            "directory was given")
        path = path.replace("{run_dir}", run_dir.rstrip("/"))
    fs, root = fsspec.core.url_to_fs(path, **source.storage_options)
    return fs, root.rstrip("/") or "/"


def _parquet_in(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    return sorted(f for f in fs.find(folder) if f.endswith(".parquet"))


def _check_columns(source: DataSource, fs: fsspec.AbstractFileSystem, first: str,
                   wanted: list[str]) -> list[str]:
    """The columns of ``first`` (a parquet or jsonl file); a missing wanted one is an error."""
    if first.endswith(".parquet"):
        with fs.open(first, "rb") as handle:
            names = pq.read_schema(handle).names
    else:
        names = None
        with fs.open(first, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    try:
                        row = json.loads(raw.decode("utf-8", errors="replace"))
                    except json.JSONDecodeError as err:
                        raise DataError(f"source {source.name!r}: {first} is not JSON lines "
                                        f"({err})") from None
                    names = list(row) if isinstance(row, dict) else []
                    break
    if names is None:  # an empty jsonl file: nothing to check; an empty corpus is counted
        return list(wanted)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"source {source.name!r}: column {', '.join(map(repr, missing))} not "
                        f"in {first} (it has: {', '.join(names) or 'no columns'}); set "
                        "text_column / language_column")
    return names


def resolve_source(source: DataSource, languages: list[str],
                   run_dir: str | None = None) -> SourceFiles:
    """The files ``source`` contributes for ``languages``; missing paths are errors.

    A language the source lists explicitly must be there; otherwise the source is read for
    whichever run languages its layout has, and a language no source has is reported later.
    """
    fs, root = _fs_for(source, run_dir)
    if not fs.exists(root):
        raise DataError(f"source {source.name!r}: path {source.path} does not exist ({root})")
    wanted = [t for t in (source.languages or languages) if t in languages]
    files: list[str] = []
    found: list[str] = []
    if source.format in ("fineweb2", "culturax"):
        for tag in wanted:
            if source.format == "fineweb2":
                folder = f"{root}/data/{tag}/train"
            else:
                try:
                    folder = f"{root}/{culturax_code(tag)}"
                except UnknownLanguageError:
                    folder = f"{root}/{tag}"
            if not fs.isdir(folder):
                if source.languages:
                    raise DataError(f"source {source.name!r}: no {source.format} folder for "
                                    f"{tag}: {folder} does not exist")
                continue
            shards = _parquet_in(fs, folder)
            if not shards:
                raise DataError(f"source {source.name!r}: {folder} has no parquet files")
            files += shards
            found.append(tag)
        if not files:
            layout = "data/<tag>/train" if source.format == "fineweb2" else "<iso639-1>"
            raise DataError(f"source {source.name!r}: no {layout} folder under {root} for any "
                            f"of {', '.join(wanted) or 'the run languages'}")
        columns = [source.text_column]
        if source.format == "fineweb2":
            names = _check_columns(source, fs, files[0], columns)
            if {"language", "language_script"} <= set(names):
                columns += ["language", "language_script"]
        else:
            _check_columns(source, fs, files[0], columns)
    else:
        suffixes = (".parquet",) if source.format == "parquet" else (".jsonl", ".json")
        if fs.isdir(root):
            files = sorted(f for f in fs.find(root) if f.endswith(suffixes))
        else:
            files = [root]
        if not files:
            raise DataError(f"source {source.name!r}: no {'/'.join(suffixes)} files under "
                            f"{root}")
        columns = [source.text_column]
        if source.language_column:
            columns.append(source.language_column)
        _check_columns(source, fs, files[0], columns)
        found = wanted
    return SourceFiles(source=source, path=root, fs=fs, files=files, languages=found,
                       columns=columns)


def repair_utf8(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Text as valid UTF-8 and the number of replacement characters put in per document.

    Parquet does not validate strings and web dumps hold stray bytes; a Python decode of such a
    value raises deep inside a worker. Valid arrays pass through untouched (one C++ check).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type):
        column = column.cast(pa.large_binary()).cast(pa.binary())
    if pa.types.is_string(column.type):
        try:
            column.validate(full=True)
            return column.fill_null(""), np.zeros(len(column), dtype=np.int32)
        except pa.ArrowInvalid:
            pass
        column = column.view(pa.binary())
    texts, counts = [], np.zeros(len(column), dtype=np.int32)
    for i, raw in enumerate(column.to_pylist()):
        if raw is None:
            texts.append("")
            continue
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            counts[i] = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
            texts.append(text)
    return pa.array(texts, pa.string()), counts


def _canonical_labels(values: list[Any], cache: dict[str, str]) -> list[str]:
    """Canonical tags of per-document labels; unknown ones become ``?<label>`` (dropped)."""
    out = []
    for value in values:
        key = "" if value is None else str(value)
        if key not in cache:
            try:
                cache[key] = canonical_tag(key) if key else ""
            except (UnknownLanguageError, ValueError):
                cache[key] = f"?{key}"
        out.append(cache[key])
    return out


def _doc_table(texts: pa.Array, bad: np.ndarray, labels: list[str], name: str) -> pa.Table:
    drop = [UNKNOWN_LANGUAGE if lab.startswith("?") else "" for lab in labels]
    return pa.Table.from_arrays(
        [texts, pa.array(labels, pa.string()), pa.array([name] * len(labels), pa.string()),
         pa.array(bad, pa.int32()), pa.array(drop, pa.string())], schema=DOC_SCHEMA)


class _Standardize:
    """Parquet rows → the document schema (a plain callable: runs fused with the read tasks)."""

    def __init__(self, source: DataSource, default_label: str) -> None:
        self.source = source
        self.default_label = default_label
        self.cache: dict[str, str] = {}
        self.path_labels: dict[str, str] = {}

    def _path_label(self, path: str) -> str:
        parts = PurePosixPath(path).parts
        if self.source.format == "fineweb2":
            return parts[-3]
        if self.source.format == "culturax":
            try:
                return culturax_tag(parts[-2])
            except UnknownLanguageError:
                return f"?{parts[-2]}"
        return self.default_label

    def __call__(self, batch: pa.Table) -> pa.Table:
        src = self.source
        texts, bad = repair_utf8(batch.column(src.text_column))
        if src.format == "fineweb2" and "language" in batch.column_names:
            raw = [f"{lang}_{script}" if lang and script else None for lang, script in
                   zip(batch.column("language").to_pylist(),
                       batch.column("language_script").to_pylist(), strict=True)]
            labels = _canonical_labels(raw, self.cache)
        elif src.format in ("fineweb2", "culturax"):
            paths = batch.column("path").to_pylist()  # one file per batch or a few
            for path in set(paths) - self.path_labels.keys():
                self.path_labels[path] = self._path_label(path)
            labels = [self.path_labels[path] for path in paths]
        elif src.language_column:
            labels = _canonical_labels(batch.column(src.language_column).to_pylist(), self.cache)
        else:
            labels = [self.default_label] * batch.num_rows
        return _doc_table(texts, bad, labels, src.name)


class _JsonLines:
    """Whole jsonl files (bytes) → one document row per line; bad lines are counted drops."""

    def __init__(self, source: DataSource, default_label: str) -> None:
        self.source = source
        self.default_label = default_label
        self.cache: dict[str, str] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        src = self.source
        texts: list[bytes | None] = []
        raw_labels: list[Any] = []
        broken: list[str] = []
        for blob in batch.column("bytes").to_pylist():
            for line in blob.splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    row = None
                text = row.get(src.text_column) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    texts.append(None)
                    raw_labels.append(None)
                    broken.append("bad_json" if row is None else "no_text")
                    continue
                try:
                    texts.append(text.encode("utf-8", errors="surrogateescape"))
                except UnicodeEncodeError:  # an escaped lone surrogate (\ud800) in the JSON
                    texts.append(text.encode("utf-8", errors="replace"))
                raw_labels.append(row.get(src.language_column) if src.language_column else None)
                broken.append("")
        repaired, bad = repair_utf8(pa.array(texts, pa.binary()))
        labels = (_canonical_labels(raw_labels, self.cache) if src.language_column
                  else [self.default_label] * len(texts))
        table = _doc_table(repaired, bad, labels, src.name)
        drops = [b or d for b, d in zip(broken, table.column("drop").to_pylist(), strict=True)]
        return table.set_column(4, "drop", pa.array(drops, pa.string()))


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> Any:
    if isinstance(fs, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def read_source(plan: SourceFiles, batch_size: int) -> Any:
    """A Ray Dataset of ``plan``'s documents in the document schema, in file and row order."""
    import ray.data

    src = plan.source
    default = plan.languages[0] if (len(plan.languages) == 1 and src.languages) else ""
    # Fractional CPUs: on a small machine the document operator's actors hold whole CPUs, and
    # read tasks asking for a whole one would wait for them forever.
    remote = {"num_cpus": 0.25}
    if src.format == "jsonl":
        ds = ray.data.read_binary_files(plan.files, filesystem=_arrow_fs(plan.fs), **remote)
        return ds.map_batches(_JsonLines(src, default), batch_size=1, batch_format="pyarrow",
                              num_cpus=0.25)
    needs_path = src.format in ("fineweb2", "culturax") and "language" not in plan.columns
    ds = ray.data.read_parquet(plan.files, filesystem=_arrow_fs(plan.fs), columns=plan.columns,
                               include_paths=needs_path, **remote)
    return ds.map_batches(_Standardize(src, default), batch_size=batch_size,
                          batch_format="pyarrow", num_cpus=0.25)
