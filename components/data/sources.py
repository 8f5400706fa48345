"""What a source resolves to: its files, the work units a worker streams, and their versions.

Kept apart from the readers so a worker (and the stage's fingerprint) handles a resolved source
without the format rules: :class:`SourceFiles` is the plan, :class:`WorkUnit` one worker's share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import DataSource

if TYPE_CHECKING:
    from components.data.readers import Reader

__all__ = ["SourceFiles", "WorkUnit"]

# fsspec ``info`` keys that change when a file's bytes do, most specific first
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "mtime", "LastModified",
                 "last_modified", "updated", "created")


@dataclass(frozen=True)
class WorkUnit:
    """What one worker reads in one go: a file, or row groups ``[first_group, end_group)`` of a
    large parquet file whose first row is ``first_row`` (``end_group`` ``None``: to the end)."""

    source: int  # index of the source in data.sources
    file: int  # index of the file in its source's sorted file list
    path: str
    first_row: int = 0
    first_group: int = 0
    end_group: int | None = None


@dataclass
class SourceFiles:
    """One source resolved to files: what to read and the reader that reads and labels it."""

    reader: Reader
    path: str
    fs: fsspec.AbstractFileSystem
    files: list[str]
    languages: list[str]  # canonical tags this source is read for
    columns: list[str] = field(default_factory=list)  # projected columns
    #: the layout's tag → the run's tag, where a layout files a language under another tag
    aliases: dict[str, str] = field(default_factory=dict)

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

    def units(self, index: int, unit_bytes: int) -> list[WorkUnit]:
        """The source's work units: one per file, parquet files over ``unit_bytes`` split at
        row-group boundaries (only those files' footers are read)."""
        out: list[WorkUnit] = []
        for i, (path, info) in enumerate(zip(self.files, self._infos, strict=True)):
            if int(info.get("size") or 0) <= unit_bytes or not path.endswith(".parquet"):
                out.append(WorkUnit(index, i, path))
                continue
            with self.fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
            start, row, size = 0, 0, 0
            for g in range(meta.num_row_groups):
                size += meta.row_group(g).total_byte_size
                if size >= unit_bytes or g == meta.num_row_groups - 1:
                    out.append(WorkUnit(index, i, path, row, start, g + 1))
                    row += sum(meta.row_group(k).num_rows for k in range(start, g + 1))
                    start, size = g + 1, 0
        return out

    def documents(self, unit: WorkUnit, batch_size: int, *,
                  cluster_size: bool = False) -> Iterator[tuple[int, pa.Table]]:
        """``(row of the first document, documents)`` batches of one unit, in row order, in the
        document schema (plus ``minhash_cluster_size`` when asked and the files have it)."""
        for row, table in self.reader.iter_unit(self, unit, batch_size, cluster_size):
            if self.aliases:
                labels = [self.aliases.get(v, v) for v in table.column("label").to_pylist()]
                table = table.set_column(1, "label", pa.array(labels, pa.string()))
            yield row, table

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
