"""Readers: find each source's files per language and read them into one document schema.

Every source, whatever its layout, becomes Arrow batches with the same columns, so the later
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

Reading is split into :class:`WorkUnit` s (a file, or a run of a large parquet file's row groups)
that a worker streams batch by batch without Ray: each unit's documents are a contiguous run of
the corpus order, so a document's stable key (source, file, row) — not the order workers happen
to finish in — decides which duplicate is first and where a document's tokens go.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any, ClassVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import DataSource
from components.data.errors import DataError
from components.data.sources import SourceFiles, WorkUnit
from components.languages import (
    UnknownLanguageError,
    canonical_tag,
    culturax_code,
    culturax_tag,
    fineweb2_tag,
)

__all__ = ["DOC_SCHEMA", "READERS", "CulturaXReader", "FineWeb2Reader", "JsonlReader",
           "ParquetReader", "Reader", "SourceFiles", "WorkUnit", "reader_for", "repair_utf8",
           "resolve_source"]

DOC_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string()), ("source", pa.string()),
                        ("bad_utf8", pa.int32()), ("drop", pa.string())])
UNKNOWN_LANGUAGE = "unknown_language"
CLUSTER_SIZE = "minhash_cluster_size"  # FineWeb2's own column, read for rehydration
_REPLACEMENT = "\ufffd"


def _fs_for(source: DataSource, run_dir: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    path = source.path
    if "{run_dir}" in path:
        if run_dir is None:
            raise DataError(f"source {source.name!r}: path {path} uses {{run_dir}} but no run "
                            "directory was given")
        path = path.replace("{run_dir}", run_dir.rstrip("/"))
    fs, root = fsspec.core.url_to_fs(path, **source.storage_options)
    return fs, root.rstrip("/") or "/"


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
        aliases = {self.layout_tag(t): t for t in found if self.layout_tag(t) != t}
        return SourceFiles(reader=self, path=root, fs=fs, files=files, languages=found,
                           columns=self._columns(fs, files[0]), aliases=aliases)

    def layout_tag(self, tag: str) -> str:
        """The tag the dataset itself uses for a run language (the canonical one by default)."""
        return tag

    def available(self, root: str, fs: fsspec.AbstractFileSystem) -> list[str] | None:
        """Tags the layout has folders for (``None``: a flat layout, which says nothing)."""
        return None

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
        table = _doc_table(texts, bad, self.labels(rows, default), self.source.name)
        if CLUSTER_SIZE in rows.column_names:
            sizes = rows.column(CLUSTER_SIZE).cast(pa.int32()).fill_null(1)
            table = table.append_column(CLUSTER_SIZE, sizes)
        return table

    def iter_unit(self, plan: SourceFiles, unit: WorkUnit, batch_size: int,
                  cluster_size: bool) -> Iterator[tuple[int, pa.Table]]:
        """One unit's documents, streamed: at most ``batch_size`` rows of text in memory."""
        with plan.fs.open(unit.path, "rb") as handle:
            pf = pq.ParquetFile(handle)
            columns = list(plan.columns)
            if cluster_size and CLUSTER_SIZE in pf.schema_arrow.names:
                columns.append(CLUSTER_SIZE)
            groups = range(unit.first_group, unit.end_group or pf.metadata.num_row_groups)
            row = unit.first_row
            for batch in pf.iter_batches(batch_size, row_groups=list(groups), columns=columns):
                rows = pa.Table.from_batches([batch])
                if self._labels_need_paths(plan.columns):
                    rows = rows.append_column("path", pa.array([unit.path] * rows.num_rows,
                                                               pa.string()))
                yield row, self.documents(rows, plan.default_label)
                row += rows.num_rows


class _LayoutReader(Reader):
    """A dataset whose directory layout names each folder's language: one folder per tag."""

    finds_languages = True
    layout: ClassVar[str]  # the folder pattern, for the error when none is there

    @abstractmethod
    def folder(self, root: str, tag: str) -> str:
        """The folder holding ``tag``'s files."""

    @abstractmethod
    def languages_root(self, root: str) -> str:
        """The folder whose subfolders are the languages."""

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
                    has = self.available(root, fs) or []
                    raise DataError(f"source {name!r}: no {self.name} folder for {tag}: "
                                    f"{folder} does not exist (it has: "
                                    f"{', '.join(has) or 'no language folders'})")
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

    def available(self, root: str, fs: fsspec.AbstractFileSystem) -> list[str] | None:
        base = self.languages_root(root)
        try:
            return sorted(PurePosixPath(p).name for p in fs.ls(base, detail=False)
                          if fs.isdir(p))
        except FileNotFoundError:
            return []

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
        return f"{root}/data/{self.layout_tag(tag)}/train"

    def languages_root(self, root: str) -> str:
        return f"{root}/data"

    def layout_tag(self, tag: str) -> str:
        return fineweb2_tag(tag)

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
        except (UnknownLanguageError, ValueError):
            return f"{root}/{tag}"

    def languages_root(self, root: str) -> str:
        return root

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
        """Whole files (a ``bytes`` column) → one document row per non-blank line."""
        return self.lines_to_documents([line for blob in files.column("bytes").to_pylist()
                                        for line in blob.splitlines()], default)

    def lines_to_documents(self, lines: list[bytes], default: str) -> pa.Table:
        """One document row per non-blank line; a line that is not a JSON object with a string
        text is kept, empty, as a ``bad_json`` / ``no_text`` drop so it is counted."""
        src = self.source
        texts: list[bytes | None] = []
        raw_labels: list[str | None] = []
        broken: list[str] = []
        for line in lines:
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

    def iter_unit(self, plan: SourceFiles, unit: WorkUnit, batch_size: int,
                  cluster_size: bool) -> Iterator[tuple[int, pa.Table]]:
        """The file's lines streamed ``batch_size`` non-blank lines at a time."""
        row, lines = 0, []
        with plan.fs.open(unit.path, "rb") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line)
                if len(lines) >= batch_size:
                    yield row, self.lines_to_documents(lines, plan.default_label)
                    row, lines = row + len(lines), []
        if lines:
            yield row, self.lines_to_documents(lines, plan.default_label)


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
