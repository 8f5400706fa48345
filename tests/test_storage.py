"""Stage contract: atomic build, manifest last, skip on match, rerun after a crash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from components.storage import MANIFEST, RunDir, StageDir, fingerprint


def _write_outputs(folder: Path, payload: bytes = b"weights") -> None:
    (folder / "model").mkdir()
    (folder / "model" / "a.bin").write_bytes(payload)
    (folder / "stats.json").write_text('{"docs": 3}')


def test_fingerprint_is_order_independent_and_sensitive() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_build_commits_files_and_manifest(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "runs"), "r1")
    stage = run.stage("data")
    with stage.build("fp1", inputs={"corpus": "x"}, config={"seq_len": 8}) as work:
        assert work.path.name.startswith("data.tmp-")
        _write_outputs(work.path)
        work.extra["documents"] = 3
    final = tmp_path / "runs" / "r1" / "data"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["fingerprint"] == "fp1"
    assert manifest["stage"] == "data"
    assert manifest["inputs"] == {"corpus": "x"}
    assert manifest["config"] == {"seq_len": 8}
    assert manifest["extra"] == {"documents": 3}
    outputs = {o["path"]: o for o in manifest["outputs"]}
    assert set(outputs) == {"model/a.bin", "stats.json"}
    assert outputs["model/a.bin"]["size"] == 7
    assert outputs["model/a.bin"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["timings"]["seconds"] >= 0
    assert {"python", "torch", "pyarrow"} <= set(manifest["versions"])
    assert [p.name for p in (tmp_path / "runs" / "r1").iterdir()] == ["data"]
    assert stage.is_complete("fp1", verify=True)
    assert not stage.is_complete("fp2")
    assert set(run.completed_stages()) == {"data"}


def test_exception_leaves_nothing_and_rerun_builds(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path / "train"))
    with pytest.raises(RuntimeError), stage.build("fp") as work:
        _write_outputs(work.path)
        raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []
    assert stage.read_manifest() is None and not stage.is_complete("fp")
    with stage.build("fp") as work:
        _write_outputs(work.path)
    assert stage.is_complete("fp")


def test_killed_process_leaves_no_complete_stage(tmp_path: Path) -> None:
    """A hard kill (no exception handlers run) mid-stage: the rerun cleans up and redoes it."""
    script = f"""
import os
from pathlib import Path
from components.storage import StageDir
stage = StageDir({str(tmp_path / "graft")!r})
with stage.build("fp") as work:
    (work.path / "half.safetensors").write_bytes(b"partial")
    os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith("graft.tmp-")
    stage = StageDir(str(tmp_path / "graft"))
    assert not stage.is_complete("fp")
    with stage.build("fp") as work:
        (work.path / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graft"]
    assert stage.is_complete("fp")


def test_folder_without_manifest_is_redone(tmp_path: Path) -> None:
    """Crash between the rename and the manifest: the folder exists but is not complete."""
    final = tmp_path / "eval"
    final.mkdir()
    (final / "stale.json").write_text("{}")
    stage = StageDir(str(final))
    assert not stage.is_complete("fp")
    with stage.build("fp") as work:
        (work.path / "results.json").write_text("[]")
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST, "results.json"]


def test_new_fingerprint_replaces_old_outputs(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path / "data"))
    with stage.build("old") as work:
        (work.path / "old.parquet").write_bytes(b"1")
    with stage.build("new") as work:
        (work.path / "new.parquet").write_bytes(b"2")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [MANIFEST, "new.parquet"]
    assert stage.is_complete("new") and not stage.is_complete("old")


def test_tampered_outputs_are_not_complete(tmp_path: Path) -> None:
    stage = StageDir(str(tmp_path / "m"))
    with stage.build("fp") as work:
        _write_outputs(work.path)
    (tmp_path / "m" / "model" / "a.bin").write_bytes(b"WEIGHTS")  # same size, other bytes
    assert stage.is_complete("fp")
    assert not stage.is_complete("fp", verify=True)
    (tmp_path / "m" / "stats.json").unlink()
    assert not stage.is_complete("fp")
    (tmp_path / "m" / MANIFEST).write_text("{ torn")
    assert stage.read_manifest() is None


def test_stage_on_fsspec_memory_filesystem() -> None:
    fs = fsspec.filesystem("memory")
    fs.rm("/fsspec-runs", recursive=True) if fs.exists("/fsspec-runs") else None
    run = RunDir("memory://fsspec-runs", "r1")
    stage = run.stage("upcycle")
    with stage.build("fp") as work:
        assert work.uri.startswith("memory://") and ".tmp-" in work.uri
        _write_outputs(work.path)  # local staging, uploaded at commit
        with fsspec.open(f"{work.uri}/direct.txt", "w") as handle:  # a distributed writer
            handle.write("written in place")
    assert sorted(fs.find("/fsspec-runs")) == [
        "/fsspec-runs/r1/upcycle/direct.txt", "/fsspec-runs/r1/upcycle/manifest.json",
        "/fsspec-runs/r1/upcycle/model/a.bin", "/fsspec-runs/r1/upcycle/stats.json",
    ]
    assert stage.is_complete("fp", verify=True)
    manifest = stage.read_manifest()
    assert manifest is not None and len(manifest.outputs) == 3
    with pytest.raises(ValueError), stage.build("fp2") as work:
        (work.path / "x").write_text("x")
        raise ValueError("boom")
    assert stage.is_complete("fp")  # the failed rebuild left the completed stage alone
    assert not [p for p in fs.find("/fsspec-runs") if ".tmp-" in p]
    assert run.local_path is None


def test_refuse_foreign_folder(tmp_path: Path) -> None:
    """A user-named folder with someone else's files is never replaced."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    stage = StageDir(str(foreign))
    with pytest.raises(FileExistsError, match="not written by deltamoe"), \
            stage.build("fp", refuse_foreign=True):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert (foreign / "notes.txt").read_text() == "keep"
    with stage.build("fp", refuse_foreign=False) as work:  # a run's own stage folder is replaced
        (work.path / "a").write_text("a")
    with stage.build("fp2", refuse_foreign=True) as work:  # ours now: rebuilding is fine
        (work.path / "b").write_text("b")
    assert sorted(p.name for p in foreign.iterdir()) == ["b", MANIFEST]
