"""Stage contract: atomic build (the manifest inside, one rename commits), skip on match,
rerun after a crash or a kill at any point of the commit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest

from components.storage import MANIFEST, RunDir, StageBuild, StageDir, fingerprint


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
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and leftovers[1].startswith("graft.tmp-")
    assert leftovers[0] == ".graft.lock"  # the dead holder's lock: the kernel released it
    stage = StageDir(str(tmp_path / "graft"))
    assert not stage.is_complete("fp")
    with stage.build("fp") as work:
        (work.path / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graft"]
    assert stage.is_complete("fp")


_KILL = """
import os, sys
from components.storage import StageDir
calls, real = [0], os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == {call} and {before}:
        os._exit(9)
    real(src, dst)
    if calls[0] == {call}:
        os._exit(9)
os.replace = replace
with StageDir({out!r}).build("new", refuse_foreign=True) as work:
    (work.path / "model.safetensors").write_bytes(b"new weights")
"""


def _model(payload: bytes) -> Callable[[StageBuild], None]:
    def build(work: StageBuild) -> None:
        (work.path / "model.safetensors").write_bytes(payload)
    return build


# the commit's renames over an old version: the manifest into the build (1), the old folder
# aside (2), the build into place (3); a hard kill before or after each
@pytest.mark.parametrize(("call", "before"), [(1, True), (1, False), (2, False), (3, True),
                                              (3, False)])
def test_a_kill_at_any_point_of_the_commit_leaves_a_stage_the_rerun_accepts(
        tmp_path: Path, call: int, before: bool) -> None:
    out = tmp_path / "moe"
    stage = StageDir(str(out))
    stage.ensure("old", _model(b"old weights"), refuse_foreign=True)
    script = _KILL.format(call=call, before=before, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    if out.exists():  # the old folder or the new, each complete with its own manifest
        manifest = stage.read_manifest()
        assert manifest is not None and stage.is_complete(manifest.fingerprint)
    _, built = stage.ensure("new", _model(b"new weights"), refuse_foreign=True)
    assert built is ((call, before) != (3, False))  # the last rename was the commit
    assert stage.is_complete("new", verify=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"new weights"


def test_a_failed_commit_puts_the_old_folder_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "moe"
    stage = StageDir(str(out))
    stage.ensure("old", _model(b"old weights"), refuse_foreign=True)
    real, failed = os.replace, []

    def replace(src: str, dst: str) -> None:
        if Path(dst) == out and not failed:  # the rename that commits the build
            failed.append(src)
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        stage.ensure("new", _model(b"new weights"), refuse_foreign=True)
    assert failed and ".tmp-" in failed[0]
    assert stage.is_complete("old", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_folder_without_manifest_is_redone(tmp_path: Path) -> None:
    """A stage folder without a manifest inside a run (an older version's interrupted commit)
    is not complete and is rebuilt."""
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
