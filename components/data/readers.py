"""Readers: find each source's files per language and read them into one document schema.

Every source, whatever its layout, becomes Ray Data rows with the same columns, so the later
operators never look at formats: ``text`` (valid UTF-8, invalid bytes replaced), ``label`` (the
dataset's own canonical language tag, ``""`` when it does not say), ``source`` (the source name),
``bad_utf8`` (replacement characters introduced) and ``drop`` (``""`` while the document is kept,
else the reason it was dropped, so each drop is counted by the operator that decided it).

One :class:`Reader` subclass per format holds that format's rules (where the files are, which
columns to read, how a document is labelled, how a file becomes rows), and :data:`READERS` maps
the config's ``format`` names to them, so adding a format is one class. Layouts: FineWeb2
``data/<tag>/train/*.parquet`` (per-document ``language`` + ``language_script``), CulturaX
``<iso639-1>/*.parquet`` (the folder is the label), plain parquet or jsonl with a configurable
text column and an optional language column. Parquet is read with column projection; jsonl is
read as bytes and split here, because Arrow's JSON reader stops at the first invalid UTF-8 byte
and web text has them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import PurePosixPath
from typing import Any, ClassVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from components.config import DataSource
from components.data.errors import DataError
from components.languages import UnknownLanguageError, canonical_tag, culturax_code, culturax_tag

__all__ = ["DOC_SCHEMA", "READERS", "CulturaXReader", "FineWeb2Reader", "JsonlReader",
           "ParquetReader", "Reader", "SourceFiles", "reader_for", "repair_utf8",
           "resolve_source"]

DOC_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string()), ("source", pa.string()),
                        ("bad_utf8", pa.int32()), ("drop", pa.string())])
UNKNOWN_LANGUAGE = "unknown_language"
_REPLACEMENT = "\ufffd"
# Fractional CPUs: on a small machine the document operator's actors hold whole CPUs, and read
# tasks asking for a whole one would wait for them forever.
_TASK_CPUS = 0.25


# fsspec ``info`` keys that change when a file's bytes do, most specific first
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "mtime", "LastModified",
                 "last_modified", "updated", "created")


@dataclass
class SourceFiles:
    """One source resolved to files: what to read and the reader that reads and labels it."""

    reader: Reader
    path: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    languages: list[str]  # canonical tags this source is read for
    columns: list[str] = field(default_factory=list)  # projected columns

    @property
    def source(self) -> DataSource:
        return self.reader.source

    @property
    def default_label(self) -> str:
        """The label of documents the dataset does not label: the one language the source lists
        for itself, else ``""`` (language ID decides)."""
        if len(self.languages) == 1 and self.source.languages:
            return self.languages[0]
        return ""

    def read(self, batch_size: int) -> Any:
        """A Ray Dataset of the documents in the document schema, in file and row order."""
        return self.reader.read(self, batch_size)

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


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> Any:
    if isinstance(fs, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


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


@lru_cache(maxsize=4096)
def _canonical_label(key: str) -> str:
    """The canonical tag of one label, ``?<label>`` when unknown (dropped later). Memoised: a
    corpus repeats a few labels, and an unknown one costs a fuzzy search for suggestions."""
    try:
        return canonical_tag(key) if key else ""
    except (UnknownLanguageError, ValueError):
        return f"?{key}"


def _canonical_labels(values: list[Any]) -> list[str]:
    """Canonical tags of per-document labels (``None`` is unlabelled: ``""``)."""
    return [_canonical_label("" if value is None else str(value)) for value in values]


def _doc_table(texts: pa.Array, bad: np.ndarray, labels: list[str], name: str) -> pa.Table:
    drop = [UNKNOWN_LANGUAGE if lab.startswith("?") else "" for lab in labels]
    return pa.Table.from_arrays(
        [texts, pa.array(labels, pa.string()), pa.array([name] * len(labels), pa.string()),
         pa.array(bad, pa.int32()), pa.array(drop, pa.string())], schema=DOC_SCHEMA)


@dataclass(frozen=True)
class Reader(ABC):
    """One source read by its format's rules: resolve its files, label and read its documents.

    Subclasses set ``name`` (the config's ``format``) and the layout rules; parquet is the
    default file format (three of the four formats), so only jsonl overrides the reading.
    """

    source: DataSource
    name: ClassVar[str]
    #: whether :meth:`resolve` learns from the layout which languages the source holds; flat
    #: files claim every wanted language, and what they hold is only known after reading
    finds_languages: ClassVar[bool] = False

    def resolve(self, languages: list[str], run_dir: str | None = None) -> SourceFiles:
        """The files the source contributes for ``languages``; missing paths are errors.

        A language the source lists explicitly must be there; otherwise the source is read for
        whichever run languages its layout has, and a language no source has is reported later.
        """
        fs, root = _fs_for(self.source, run_dir)
        if not fs.exists(root):
            raise DataError(f"source {self.source.name!r}: path {self.source.path} does not "
                            f"exist ({root})")
        wanted = [t for t in (self.source.languages or languages) if t in languages]
        files, found = self._files(fs, root, wanted)
        return SourceFiles(reader=self, path=root, fs=fs, files=files, languages=found,
                           columns=self._columns(fs, files[0]))

    @abstractmethod
    def _files(self, fs: fsspec.AbstractFileSystem, root: str,
               wanted: list[str]) -> tuple[list[str], list[str]]:
        """The files under ``root`` to read (at least one) and the wanted languages they hold."""

    def _columns(self, fs: fsspec.AbstractFileSystem, first: str) -> list[str]:
        """The columns to read, checked against the first file: the text column."""
        columns = [self.source.text_column]
        self._require(fs, first, columns)
        return columns

    def _column_names(self, fs: fsspec.AbstractFileSystem, first: str) -> list[str] | None:
        """The columns ``first`` has; ``None`` for a file with none to check (empty jsonl)."""
        with fs.open(first, "rb") as handle:
            return pq.read_schema(handle).names

    def _require(self, fs: fsspec.AbstractFileSystem, first: str,
                 wanted: list[str]) -> list[str]:
        """The columns of ``first``; a missing wanted one is an error naming the ones it has."""
        names = self._column_names(fs, first)
        if names is None:  # an empty file: nothing to check; an empty corpus is counted
            return list(wanted)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(f"source {self.source.name!r}: column "
                            f"{', '.join(map(repr, missing))} not in {first} (it has: "
                            f"{', '.join(names) or 'no columns'}); set text_column / "
                            "language_column")
        return names

    @abstractmethod
    def labels(self, rows: pa.Table, default: str) -> list[str]:
        """Each row's language as the dataset itself gives it: a canonical tag, ``?<label>``
        for one it gives but no language has, ``default`` where it says nothing."""

    def _labels_need_paths(self, columns: list[str]) -> bool:
        """Whether :meth:`labels` reads each row's file path (the read then carries it)."""
        return False

    def documents(self, rows: pa.Table, default: str) -> pa.Table:
        """Rows as read (text and label columns) → the document schema."""
        texts, bad = repair_utf8(rows.column(self.source.text_column))
        return _doc_table(texts, bad, self.labels(rows, default), self.source.name)

    def read(self, plan: SourceFiles, batch_size: int) -> Any:
        """A Ray Dataset of ``plan``'s documents in the document schema, in file and row order."""
        import ray.data

        ds = ray.data.read_parquet(plan.files, filesystem=_arrow_fs(plan.fs),
                                   columns=plan.columns,
                                   include_paths=self._labels_need_paths(plan.columns),
                                   num_cpus=_TASK_CPUS)
        return ds.map_batches(self.documents, fn_kwargs={"default": plan.default_label},
                              batch_size=batch_size, batch_format="pyarrow",
                              num_cpus=_TASK_CPUS)


class _LayoutReader(Reader):
    """A dataset whose directory layout names each folder's language: one folder per tag."""

    finds_languages = True
    layout: ClassVar[str]  # the folder pattern, for the error when none is there

    @abstractmethod
    def folder(self, root: str, tag: str) -> str:
        """The folder holding ``tag``'s files."""

    @abstractmethod
    def file_label(self, path: str) -> str:
        """The label a file's place in the layout gives its documents."""

    def _files(self, fs: fsspec.AbstractFileSystem, root: str,
               wanted: list[str]) -> tuple[list[str], list[str]]:
        name = self.source.name
        files: list[str] = []
        found: list[str] = []
        for tag in wanted:
            folder = self.folder(root, tag)
            if not fs.isdir(folder):
                if self.source.languages:
                    raise DataError(f"source {name!r}: no {self.name} folder for {tag}: "
                                    f"{folder} does not exist")
                continue
            shards = sorted(f for f in fs.find(folder) if f.endswith(".parquet"))
            if not shards:
                raise DataError(f"source {name!r}: {folder} has no parquet files")
            files += shards
            found.append(tag)
        if not files:
            raise DataError(f"source {name!r}: no {self.layout} folder under {root} for any "
                            f"of {', '.join(wanted) or 'the run languages'}")
        return files, found

    def labels(self, rows: pa.Table, default: str) -> list[str]:
        paths = rows.column("path").to_pylist()  # one file per batch or a few
        by_path = {path: self.file_label(path) for path in set(paths)}
        return [by_path[path] for path in paths]

    def _labels_need_paths(self, columns: list[str]) -> bool:
        return True


class FineWeb2Reader(_LayoutReader):
    """FineWeb2: ``data/<tag>/train/*.parquet``; each document's ``language`` and
    ``language_script`` columns label it where the files have them, else its folder."""

    name = "fineweb2"
    layout = "data/<tag>/train"

    def folder(self, root: str, tag: str) -> str:
        return f"{root}/data/{tag}/train"

    def file_label(self, path: str) -> str:
        return PurePosixPath(path).parts[-3]

    def _columns(self, fs: fsspec.AbstractFileSystem, first: str) -> list[str]:
        columns = [self.source.text_column]
        if {"language", "language_script"} <= set(self._require(fs, first, columns)):
            columns += ["language", "language_script"]
        return columns

    def labels(self, rows: pa.Table, default: str) -> list[str]:
        if "language" not in rows.column_names:
            return super().labels(rows, default)
        return _canonical_labels([
            f"{lang}_{script}" if lang and script else None for lang, script in
            zip(rows.column("language").to_pylist(), rows.column("language_script").to_pylist(),
                strict=True)])

    def _labels_need_paths(self, columns: list[str]) -> bool:
        return "language" not in columns


class CulturaXReader(_LayoutReader):
    """CulturaX: ``<iso639-1>/*.parquet``; the folder's CulturaX code is the label."""

    name = "culturax"
    layout = "<iso639-1>"

    def folder(self, root: str, tag: str) -> str:
        try:
            return f"{root}/{culturax_code(tag)}"
        except UnknownLanguageError:
            return f"{root}/{tag}"

    def file_label(self, path: str) -> str:
        code = PurePosixPath(path).parts[-2]
        try:
            return culturax_tag(code)
        except UnknownLanguageError:
            return f"?{code}"


class _FlatReader(Reader):
    """Files of one kind anywhere under the path (or the path itself), with a text column and
    an optional language column; the source's own ``languages`` label what that column does not."""

    suffixes: ClassVar[tuple[str, ...]]

    def _files(self, fs: fsspec.AbstractFileSystem, root: str,
               wanted: list[str]) -> tuple[list[str], list[str]]:
        if fs.isdir(root):
            files = sorted(f for f in fs.find(root) if f.endswith(self.suffixes))
        else:
            files = [root]
        if not files:
            raise DataError(f"source {self.source.name!r}: no {'/'.join(self.suffixes)} files "
                            f"under {root}")
        return files, wanted

    def _columns(self, fs: fsspec.AbstractFileSystem, first: str) -> list[str]:
        columns = [self.source.text_column]
        if self.source.language_column:
            columns.append(self.source.language_column)
        self._require(fs, first, columns)
        return columns

    def labels(self, rows: pa.Table, default: str) -> list[str]:
        if self.source.language_column:
            return _canonical_labels(rows.column(self.source.language_column).to_pylist())
        return [default] * rows.num_rows


class ParquetReader(_FlatReader):
    """Plain parquet files."""

    name = "parquet"
    suffixes = (".parquet",)


class JsonlReader(_FlatReader):
    """JSON lines, one document object per line, read as bytes and split here (Arrow's JSON
    reader stops at the first invalid UTF-8 byte); a broken line is a counted drop, not an
    error, because web dumps have a few."""

    name = "jsonl"
    suffixes = (".jsonl", ".json")

    def _column_names(self, fs: fsspec.AbstractFileSystem, first: str) -> list[str] | None:
        """The keys of the first non-blank line's object."""
        with fs.open(first, "rb") as handle:
            for raw in handle:
                if raw.strip():
                    try:
                        row = json.loads(raw.decode("utf-8", errors="replace"))
                    except json.JSONDecodeError as err:
                        raise DataError(f"source {self.source.name!r}: {first} is not JSON "
                                        f"lines ({err})") from None
                    return list(row) if isinstance(row, dict) else []
        return None

    def split_lines(self, files: pa.Table, default: str) -> pa.Table:
        """Whole files (a ``bytes`` column) → one document row per non-blank line; a line that
        is not a JSON object with a string text is kept, empty, as a ``bad_json`` / ``no_text``
        drop so the ledger counts it."""
        src = self.source
        texts: list[bytes | None] = []
        raw_labels: list[str | None] = []
        broken: list[str] = []
        for blob in files.column("bytes").to_pylist():
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
                label = row.get(src.language_column) if src.language_column else None
                raw_labels.append(None if label is None else str(label))
                broken.append("")
        rows = {src.text_column: pa.array(texts, pa.binary())}
        if src.language_column:
            rows[src.language_column] = pa.array(raw_labels, pa.string())
        table = self.documents(pa.table(rows), default)
        drops = [b or d for b, d in zip(broken, table.column("drop").to_pylist(), strict=True)]
        return table.set_column(4, "drop", pa.array(drops, pa.string()))

    def read(self, plan: SourceFiles, batch_size: int) -> Any:
        import ray.data

        ds = ray.data.read_binary_files(plan.files, filesystem=_arrow_fs(plan.fs),
                                        num_cpus=_TASK_CPUS)
        return ds.map_batches(self.split_lines, fn_kwargs={"default": plan.default_label},
                              batch_size=1, batch_format="pyarrow", num_cpus=_TASK_CPUS)


READERS: dict[str, type[Reader]] = {
    reader.name: reader for reader in (FineWeb2Reader, CulturaXReader, JsonlReader, ParquetReader)
}


def reader_for(format_name: str) -> type[Reader]:
    """The reader class of a source ``format``; an unknown one is an error naming the known."""
    try:
        return READERS[format_name]
    except KeyError:
        raise DataError(f"unknown source format {format_name!r}; known formats: "
                        f"{', '.join(READERS)}") from None


def resolve_source(source: DataSource, languages: list[str],
                   run_dir: str | None = None) -> SourceFiles:
    """``source`` resolved by its format's reader (see :meth:`Reader.resolve`)."""
    return reader_for(source.format)(source).resolve(languages, run_dir)
