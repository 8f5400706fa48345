"""Run directories and the stage contract: atomic, resumable, verifiable.

A stage (data, upcycle, train, graft, eval, ...) builds into a temporary sibling of its final
folder, ``manifest.json`` included, and is renamed into place only when complete: on a local
disk the rename is the commit, so a kill at any point leaves the old folder, no folder, or the
complete new one, never a complete-looking folder without a manifest. A rerun redoes the stage;
a stage whose manifest carries the same fingerprint (config section + inputs) is skipped.

An output folder is never one of the stage's inputs nor above or inside one; a folder is only
replaced when every file in it is one its manifest lists (files a user added are never deleted);
and one writer at a time holds a folder (a lock file next to it), so a second writer into the
same folder is refused instead of deleting the first one's build.

Everything goes through fsspec, so the same code runs on a local disk, NFS, or an object store
(``s3://``, ``gs://``): on stores without rename, ``mv`` copies, and the manifest-last rule still
makes the commit atomic from a reader's point of view (there the manifest is written last, and
the lock is not taken: object stores have no advisory locks).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
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
    "UnsafeOutputError",
    "atomic_write_bytes",
    "fingerprint",
    "sha256_file",
]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TMP_MARK = ".tmp-"
_OWN_TMP = re.compile(r"\.tmp-[0-9a-f]{32}$")  # what a killed atomic_write_bytes leaves
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


class UnsafeOutputError(FileExistsError):
    """An output folder that must not be written: it overlaps an input, holds files this
    project did not write, or another process is writing it. Bad input (exit 2), raised before
    anything is deleted or written."""


def _local_paths(node: Any) -> Iterator[str]:
    """Every string in ``node`` (a stage's declared inputs) that names an existing local path,
    resolved through symlinks."""
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _local_paths(value)
    elif isinstance(node, list | tuple | set | frozenset):
        for value in node:
            yield from _local_paths(value)
    elif isinstance(node, str | os.PathLike) and str(node) and "://" not in str(node):
        if os.path.exists(node):
            yield os.path.realpath(node)


def check_not_an_input(output: str, inputs: Any) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``: committing
    it would delete (or build inside) what the stage reads, e.g. ``--model w/model --out w``."""
    out = os.path.realpath(output)
    for inp in _local_paths(inputs):
        if out == inp:
            why = "is"
        elif inp.startswith(out.rstrip(os.sep) + os.sep):
            why = "contains"
        elif out.startswith(inp.rstrip(os.sep) + os.sep):
            why = "lies inside"
        else:
            continue
        raise UnsafeOutputError(f"{output}: the output folder {why} the input {inp}; "
                                "writing it would replace what it reads; choose another folder")


@contextmanager
def output_lock(path: str) -> Iterator[None]:
    """Hold ``.<name>.lock`` next to the local folder ``path`` while a stage writes it.

    ``flock`` is released by the kernel when its holder dies, so a lock left by a killed
    process is simply taken; a live holder (any process, this one included) makes the second
    writer fail at once, naming the holder's pid and host, instead of deleting its build.
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                with open(lock, encoding="utf-8") as handle:
                    holder = handle.read().strip() or "another process"
            except OSError:
                holder = "another process"
            raise UnsafeOutputError(f"{path}: being written by {holder} (lock {lock}); wait "
                                    "for it to finish or choose another folder") from None
        try:  # the holder before us may have removed the file between our open and flock
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        try:
            os.unlink(lock)  # still holding it: a waiter re-checks the inode (above)
        finally:
            os.close(fd)


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

    def _refuse_unknown_files(self, refuse_foreign: bool) -> None:
        """Refuse to replace a folder holding a file its manifest does not list (a user's), or,
        with ``refuse_foreign`` (folders a user names with ``--out``), a non-empty folder
        without a manifest. Inside a run folder a stage folder without a manifest is the
        project's own interrupted build and is replaced."""
        if not self.fs.isdir(self.path):
            return
        present = sorted(f[len(self.path):].lstrip("/") for f in self.fs.find(self.path))
        if not present:
            return
        manifest = self.read_manifest()
        if manifest is None:
            if refuse_foreign:
                raise UnsafeOutputError(f"{self.uri} exists, is not empty and was not written "
                                        "by deltamoe; choose a new or empty folder")
            return
        listed = {o.path for o in manifest.outputs} | {MANIFEST}
        extra = [p for p in present if p not in listed and not _OWN_TMP.search(p)]
        if extra:
            shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if extra[10:] else "")
            raise UnsafeOutputError(f"{self.uri} holds files deltamoe did not write (not in its "
                                    f"{MANIFEST}): {shown}; move them away or choose another "
                                    "folder")

    @contextmanager
    def build(self, stage_fingerprint: str, *, inputs: Mapping[str, Any] | None = None,
              config: Mapping[str, Any] | None = None,
              refuse_foreign: bool = False) -> Iterator[StageBuild]:
        """Build the stage in a temporary sibling; commit it by one rename on success.

        On any exception the temporary sibling is removed and the previous state of the stage is
        left as it was, so nothing half-written ever looks complete. Before anything is written
        the folder is checked: not one of the local paths in ``inputs`` (nor above or inside
        one), no file in it that its manifest does not list, not being written by
        another process (the lock is held until the commit); ``refuse_foreign`` is for folders a
        user names (``--out``): one that is not empty and has no manifest is refused.
        """
        if self.is_local:
            check_not_an_input(self.path, dict(inputs or {}))
        with output_lock(self.path) if self.is_local else nullcontext():
            self._refuse_unknown_files(refuse_foreign)
            yield from self._build(stage_fingerprint, dict(inputs or {}), dict(config or {}))

    def _build(self, stage_fingerprint: str, inputs: dict[str, Any],
               config: dict[str, Any]) -> Iterator[StageBuild]:
        started = time.time()
        self._clean_stale()
        tmp = f"{self.path}{_TMP_MARK}{uuid.uuid4().hex}"
        self.fs.makedirs(tmp, exist_ok=True)
        local_dir = Path(tmp) if self.is_local else Path(tempfile.mkdtemp(prefix="deltamoe-"))
        work = StageBuild(path=local_dir, uri=self._uri_for(tmp))
        aside = f"{self.path}{_TMP_MARK}old-{uuid.uuid4().hex}"
        try:
            yield work
            if not self.is_local:
                files = [p for p in local_dir.rglob("*") if p.is_file()]
                for local in files:
                    rel = local.relative_to(local_dir).as_posix()
                    self.fs.put_file(str(local), f"{tmp}/{rel}")
            outputs = self._list_outputs(tmp)
            finished = time.time()
            manifest = Manifest(
                stage=self.name, fingerprint=stage_fingerprint, inputs=inputs, config=config,
                outputs=outputs,
                timings={
                    "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
                    "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(),
                    "seconds": round(finished - started, 3),
                },
                versions=package_versions(), extra=work.extra, placement=placement(),
            )
            blob = manifest.to_json().encode("utf-8")
            if self.is_local:
                # Commit: the manifest is already inside the build, so the rename that puts the
                # build in place is the commit; the old folder steps aside first (a rename too)
                # and is deleted after. A kill anywhere leaves the old folder, only build
                # siblings (the rerun deletes them and rebuilds), or the complete new folder.
                atomic_write_bytes(self.fs, f"{tmp}/{MANIFEST}", blob)
                if os.path.lexists(self.path):
                    os.replace(self.path, aside)
                os.replace(tmp, self.path)
                shutil.rmtree(aside, ignore_errors=True)
            else:  # no rename on object stores: the old manifest goes first, the new one last
                if self.fs.exists(self.manifest_path):
                    self.fs.rm(self.manifest_path)
                if self.fs.exists(self.path):
                    self.fs.rm(self.path, recursive=True)
                self.fs.mv(tmp, self.path, recursive=True)
                atomic_write_bytes(self.fs, self.manifest_path, blob)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
            if self.is_local and os.path.lexists(aside) and not os.path.lexists(self.path):
                os.replace(aside, self.path)  # the failed commit puts the old folder back
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
            if _TMP_MARK in name or name.startswith("."):  # builds, locks
                continue
            manifest = self.stage(name).read_manifest()
            if manifest is not None:
                found[name] = manifest
        return found
