"""Run directories and the stage contract: atomic, resumable, verifiable.

A stage (data, upcycle, train, graft, eval, ...) builds into a temporary sibling of its final
folder and is renamed into place only when complete; ``manifest.json`` is written last and is
the only mark of completion. So a crash at any point leaves either no final folder or a folder
without a manifest, and a rerun redoes the stage; a stage whose manifest carries the same
fingerprint (config section + inputs) is skipped.

Everything goes through fsspec, so the same code runs on a local disk, NFS, or an object store
(``s3://``, ``gs://``): on stores without rename, ``mv`` copies, and the manifest-last rule still
makes the commit atomic from a reader's point of view.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "MANIFEST",
    "Manifest",
    "RunDir",
    "StageBuild",
    "StageDir",
    "atomic_write_bytes",
    "fingerprint",
    "sha256_file",
]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TMP_MARK = ".tmp-"
_CHUNK = 8 * 1024 * 1024
_TRACKED_PACKAGES = (
    "deltamoe", "torch", "transformers", "tokenizers", "safetensors", "ray", "mlflow",
    "pyarrow", "lm_eval", "pydantic",
)


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts``: equal inputs, equal fingerprint, any machine."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Streamed sha256 of one file, never holding it in memory (checkpoints are many GB)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a stage's output, recorded in every manifest."""
    versions = {"python": sys.version.split()[0]}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def placement() -> dict[str, Any]:
    """Where this process runs: host and pid, and inside Ray the node id and the resources the
    task or actor was given, so a manifest says where its stage ran."""
    where: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")  # only when this process already uses Ray: never start it
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        context = ray.get_runtime_context()
        where["node_id"] = context.get_node_id()
        try:
            where["resources"] = context.get_assigned_resources()
        except AssertionError:  # Ray 2.60 asserts in a driver: only tasks and actors have any
            where["resources"] = {}
    return where


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX, overwrites
    else:
        fs.mv(tmp, path)


@dataclass(frozen=True)
class OutputFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a completed stage declares: enough to skip it, audit it, or verify its bytes."""

    stage: str
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]
    outputs: list[OutputFile]
    timings: dict[str, Any]
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    placement: dict[str, Any] = field(default_factory=dict)  # host, pid, Ray node, resources

    def to_json(self) -> str:
        data = {
            "version": self.version, "stage": self.stage, "fingerprint": self.fingerprint,
            "inputs": self.inputs, "config": self.config,
            "outputs": [vars(o) for o in self.outputs], "timings": self.timings,
            "versions": self.versions, "extra": self.extra, "placement": self.placement,
        }
        return json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(
            stage=data["stage"], fingerprint=data["fingerprint"], inputs=data["inputs"],
            config=data["config"], outputs=[OutputFile(**o) for o in data["outputs"]],
            timings=data["timings"], versions=data["versions"], extra=data.get("extra", {}),
            version=data.get("version", MANIFEST_VERSION), placement=data.get("placement", {}),
        )

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.outputs)


@dataclass
class StageBuild:
    """Where a running stage writes.

    ``path`` is always a local directory, for libraries that need one (safetensors, tokenizers).
    ``uri`` is the temporary sibling on the target filesystem, for distributed writers (Ray Data
    workers writing parquet straight to shared storage). On a local filesystem both are the same
    directory. ``extra`` goes into the manifest (counts, statistics).
    """

    path: Path
    uri: str
    extra: dict[str, Any] = field(default_factory=dict)


class StageDir:
    """One stage folder (or any output folder that should be built atomically)."""

    def __init__(self, uri: str, *, name: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.path = root.rstrip("/")
        self.uri = uri.rstrip("/")
        self.name = name or self.path.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def manifest_path(self) -> str:
        return f"{self.path}/{MANIFEST}"

    def read_manifest(self) -> Manifest | None:
        """The stage's manifest, or None when the stage never completed (or it is unreadable)."""
        try:
            with self.fs.open(self.manifest_path, "r", encoding="utf-8") as handle:
                return Manifest.from_json(handle.read())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign manifest is not a completion mark

    def is_complete(self, expected_fingerprint: str, *, verify: bool = False) -> bool:
        """True when the manifest matches and every declared output is there with its size.

        ``verify`` also re-hashes every output (slow on large checkpoints; for audits).
        """
        manifest = self.read_manifest()
        if manifest is None or manifest.fingerprint != expected_fingerprint:
            return False
        for out in manifest.outputs:
            full = f"{self.path}/{out.path}"
            try:
                if self.fs.size(full) != out.size:
                    return False
            except FileNotFoundError:
                return False
            if verify and sha256_file(self.fs, full) != out.sha256:
                return False
        return True

    def _clean_stale(self) -> None:
        parent, base = self.path.rsplit("/", 1) if "/" in self.path else ("", self.path)
        try:
            siblings = self.fs.ls(parent or ".", detail=False)
        except FileNotFoundError:
            return
        for sib in siblings:
            if sib.rstrip("/").rsplit("/", 1)[-1].startswith(f"{base}{_TMP_MARK}"):
                self.fs.rm(sib, recursive=True)

    def _list_outputs(self, root: str) -> list[OutputFile]:
        """Every file under ``root`` with size and sha256, hashed in parallel threads (hashlib
        releases the GIL, and a checkpoint is many shards)."""
        files = [f for f in sorted(self.fs.find(root)) if f[len(root):].lstrip("/") != MANIFEST]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda f: sha256_file(self.fs, f), files))
        return [OutputFile(f[len(root):].lstrip("/"), int(self.fs.size(f)), d)
                for f, d in zip(files, digests, strict=True)]

    @contextmanager
    def build(self, stage_fingerprint: str, *, inputs: Mapping[str, Any] | None = None,
              config: Mapping[str, Any] | None = None,
              refuse_foreign: bool = False) -> Iterator[StageBuild]:
        """Build the stage in a temporary sibling; commit it (rename, then manifest) on success.

        On any exception the temporary sibling is removed and the previous state of the stage is
        left as it was, so nothing half-written ever looks complete. ``refuse_foreign`` is for
        folders a user names (``--out``): a commit replaces the folder, so one that is not empty
        and has no manifest (not written by this tool) is refused before anything is written.
        """
        if refuse_foreign and self.fs.isdir(self.path) and self.fs.ls(self.path) \
                and self.read_manifest() is None:
            raise FileExistsError(f"{self.uri} exists, is not empty and was not written by "
                                  "deltamoe; choose a new or empty folder")
        started = time.time()
        self._clean_stale()
        tmp = f"{self.path}{_TMP_MARK}{uuid.uuid4().hex}"
        self.fs.makedirs(tmp, exist_ok=True)
        local_dir = Path(tmp) if self.is_local else Path(tempfile.mkdtemp(prefix="deltamoe-"))
        work = StageBuild(path=local_dir, uri=self._uri_for(tmp))
        try:
            yield work
            if not self.is_local:
                files = [p for p in local_dir.rglob("*") if p.is_file()]
                for local in files:
                    rel = local.relative_to(local_dir).as_posix()
                    self.fs.put_file(str(local), f"{tmp}/{rel}")
            outputs = self._list_outputs(tmp)
            # Commit: the old manifest goes first, so the old folder can never pass for the
            # new stage; then the folder is swapped; the new manifest is written last.
            if self.fs.exists(self.manifest_path):
                self.fs.rm(self.manifest_path)
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
            if self.is_local:
                os.replace(tmp, self.path)
            else:
                self.fs.mv(tmp, self.path, recursive=True)
            finished = time.time()
            manifest = Manifest(
                stage=self.name, fingerprint=stage_fingerprint, inputs=dict(inputs or {}),
                config=dict(config or {}), outputs=outputs,
                timings={
                    "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
                    "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(),
                    "seconds": round(finished - started, 3),
                },
                versions=package_versions(), extra=work.extra, placement=placement(),
            )
            atomic_write_bytes(self.fs, self.manifest_path, manifest.to_json().encode("utf-8"))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
            raise
        finally:
            if not self.is_local:
                shutil.rmtree(local_dir, ignore_errors=True)

    def ensure(self, stage_fingerprint: str, build: Callable[[StageBuild], None], *,
               inputs: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
               refuse_foreign: bool = False) -> tuple[Manifest, bool]:
        """Skip the stage when its manifest matches, else ``build`` it atomically: the one
        skip-or-build sequence every stage follows. Returns (manifest, built)."""
        if not self.is_complete(stage_fingerprint):
            with self.build(stage_fingerprint, inputs=inputs, config=config,
                            refuse_foreign=refuse_foreign) as work:
                build(work)
            built = True
        else:
            built = False
        manifest = self.read_manifest()
        if manifest is None:  # removed between the commit and this read: not ours to hide
            raise FileNotFoundError(f"{self.manifest_path}: vanished right after the stage")
        return manifest, built

    def _uri_for(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)


class RunDir:
    """``<root>/<run_name>/`` with one StageDir per stage, on any fsspec filesystem."""

    def __init__(self, root: str, run_name: str,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, root_path = fsspec.core.url_to_fs(root, **self.storage_options)
        if isinstance(self.fs, LocalFileSystem):
            root = str(Path(root_path).resolve())
        self.uri = f"{root.rstrip('/')}/{run_name}"
        self.run_name = run_name
        self.fs.makedirs(fsspec.core.url_to_fs(self.uri, **self.storage_options)[1],
                         exist_ok=True)

    @property
    def local_path(self) -> Path | None:
        """The run folder as a local Path, or None on a remote store."""
        return Path(self.uri) if isinstance(self.fs, LocalFileSystem) else None

    def stage(self, name: str) -> StageDir:
        return StageDir(f"{self.uri}/{name}", name=name, storage_options=self.storage_options)

    def completed_stages(self) -> dict[str, Manifest]:
        """Every stage that has a readable manifest, by name (for reports and ``status``)."""
        found = {}
        _, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        for entry in sorted(self.fs.ls(root, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _TMP_MARK in name:
                continue
            manifest = self.stage(name).read_manifest()
            if manifest is not None:
                found[name] = manifest
        return found
