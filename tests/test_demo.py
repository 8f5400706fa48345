"""The demo entry points: `deltamoe demo world` (atomic, deterministic, loadable offline) and
`deltamoe demo` (world stage + MLflow parent/child runs, skipped on rerun)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components.storage import MANIFEST
from workflows.cli import DEMO_CONFIG

SMALL = ["--people", "16", "--docs", "24", "--vocab-size", "600"]


def _deltamoe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("worlds")
    for name in ("a", "b"):
        proc = _deltamoe("demo", "world", "--out", str(root / name), "--seed", "3", *SMALL)
        assert proc.returncode == 0, proc.stderr
        assert "world built" in proc.stdout
    return root / "a", root / "b"


def test_same_seed_gives_byte_identical_world(two_worlds: tuple[Path, Path]) -> None:
    a, b = (_digests(p) for p in two_worlds)
    # manifest.json records when each build ran; every file it lists must be identical
    assert a.pop(MANIFEST) and b.pop(MANIFEST)
    assert a == b
    assert len(a) > 20


def test_world_layouts_and_offline_loading(two_worlds: tuple[Path, Path]) -> None:
    world = two_worlds[0]
    fineweb = sorted(p.name for p in (world / "corpora/fineweb2/data").iterdir())
    culturax = sorted(p.name for p in (world / "corpora/culturax").iterdir())
    assert len(fineweb) >= 4 and len(culturax) >= 4
    assert any(tag.endswith("_Cyrl") for tag in fineweb)
    split = json.loads((world / "world.json").read_text())["split"]
    assert sorted([*split["original"], *split["new"]]) == fineweb
    base = sorted(p.name for p in (world / "corpora/base/fineweb2/data").iterdir())
    assert base == fineweb  # the base's pre-training text holds every language
    for tag in fineweb:
        assert list((world / "corpora/fineweb2/data" / tag / "train").glob("*.parquet"))
        assert (world / "eval" / tag).is_dir()
        # post-training data only where the base knows the language
        assert (world / "instructions" / tag).is_dir() == (tag in split["original"])
    script = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(world / 'model')!r})
model = AutoModelForCausalLM.from_pretrained({str(world / 'model')!r})
ids = tok("Kamoru", return_tensors="pt").input_ids
print(model(ids).logits.shape[-1] == len(tok))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("True")


def test_rerun_skips_and_other_seed_differs(two_worlds: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    again = _deltamoe("demo", "world", "--out", str(two_worlds[0]), "--seed", "3", *SMALL)
    assert again.returncode == 0 and "already complete, skipped" in again.stdout
    other = tmp_path / "c"
    proc = _deltamoe("demo", "world", "--out", str(other), "--seed", "4", *SMALL)
    assert proc.returncode == 0, proc.stderr
    a, c = _digests(two_worlds[0]), _digests(other)
    assert a["corpora/fineweb2/data/eng_Latn/train/000_00000.parquet"] != \
        c["corpora/fineweb2/data/eng_Latn/train/000_00000.parquet"]


def test_workflow_tracks_its_stages_and_skips_complete_ones(tmp_path: Path) -> None:
    from workflows.demo import run_demo

    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["world"].update(num_people=16, docs_per_language=24, vocab_size=600, base_steps=0)
    cfg["storage"]["root"] = str(tmp_path / "runs")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the first run as a user starts it, its log captured: the project's lines and real
    # warnings only (a whole demo stays under 150 lines; README "Tracking")
    first = _deltamoe("run", str(path), "--only", "world", "--only", "upcycle")
    assert first.returncode == 0, first.stderr[-3000:]
    log = (first.stderr + first.stdout).splitlines()
    assert len(log) <= 25, "\n".join(log)
    noise = re.compile(r"alembic|mlflow\.store|Building contexts|gen_kwargs|it/s\]|Traceback")
    assert not [line for line in log if noise.search(line)], "\n".join(log)
    assert re.search(r"INFO +stage 1/2 world: built \(", first.stderr)
    assert re.search(r"INFO +stage 2/2 moe_init: built \(", first.stderr)
    assert not [line for line in log if line.endswith(" ")]  # not laid out to 80 columns
    assert "mlflow ui --backend-store-uri" in first.stdout
    second = run_demo(path, only=("world", "upcycle"))
    skipped = "skipped (manifest matches)"
    assert second.stages == {"world": skipped, "moe_init": skipped}
    client = MlflowClient(second.tracking_uri)
    assert second.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'demo' / 'mlflow.db'}"
    experiment = client.get_experiment_by_name("deltamoe-demo")
    parents = client.search_runs([experiment.experiment_id], "tags.`deltamoe.kind` = 'expansion'")
    assert [p.info.run_id for p in parents] == [second.parent_run_id]  # reattached
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["languages.new"] == '["swh_Latn", "rus_Cyrl"]'
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{second.parent_run_id}'")
    by_stage = {c.data.tags["deltamoe.stage"]: c for c in children}
    assert sorted(by_stage) == ["moe_init", "world"]
    child, upcycled = by_stage["world"], by_stage["moe_init"]
    assert child.data.metrics["world/files"] > 20
    assert child.data.metrics["world/documents/swh_Latn"] == 24 + 1 + 1  # + planted dup, junk
    # the demo's allocation: 4 experts, Swahili [1, 2], Russian [1, 3], top-2 of 4
    assert upcycled.data.metrics["upcycle/active_ratio"] > 1.0
    assert upcycled.data.metrics["upcycle/moe_parameters"] > \
        upcycled.data.metrics["upcycle/active_parameters"]
    allocation = json.loads((tmp_path / "runs/demo/models/moe_init/allocation.json").read_text())
    assert allocation["experts"]["swh_Latn"] == [1, 2]
    models = {m.name: m for m in client.search_logged_models([parent.info.experiment_id])}
    assert sorted(models) == ["moe_init", "world-base-init"]
    assert models["world-base-init"].tags["uri"].endswith("/demo/world/model")
    assert models["moe_init"].tags["uri"].endswith("/demo/models/moe_init")
    assert "mlflow ui --backend-store-uri" in second.summary()


def test_world_refuses_a_foreign_folder(tmp_path: Path) -> None:
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    proc = _deltamoe("demo", "world", "--out", str(precious), *SMALL)
    assert proc.returncode == 2
    assert "is not empty and was not written by deltamoe" in proc.stderr
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
