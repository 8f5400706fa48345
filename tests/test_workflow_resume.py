"""Killing `deltamoe run` in the middle of a stage and running it again resumes: the completed
stages are skipped by their manifests, the interrupted training resumes from its last checkpoint,
and nothing of the killed stage looks complete in between."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from workflows.cli import DEMO_CONFIG

STAGES = ["world", "post", "data", "upcycle", "cpt_moe"]


def _config(tmp: Path) -> Path:
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["world"].update(num_people=16, docs_per_language=40, vocab_size=600, base_steps=0,
                        post_steps=4)
    cfg["data"]["seq_len"] = 64
    cfg["train"].update(steps=60, micro_batch_size=4, checkpoint_every=5, log_every=5)
    cfg["storage"]["root"] = str(tmp / "runs")
    cfg["resources"]["launcher"] = "inline"
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(path: Path) -> list[str]:
    only = [arg for stage in STAGES for arg in ("--only", stage)]
    return [sys.executable, "-m", "workflows.cli", "run", str(path), *only]


def test_killed_workflow_resumes_from_the_last_completed_stage(tmp_path: Path) -> None:
    path = _config(tmp_path)
    run = tmp_path / "runs" / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(_command(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, text=True)
    checkpoints = run / "checkpoints" / "cpt_moe"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(checkpoints.glob("*/checkpoint_0*")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert list(checkpoints.glob("*/checkpoint_0*")), "cpt_moe never wrote a checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    # killed mid-stage: the earlier stages are complete, cpt_moe is not
    for stage in ("world", "data", "models/moe_init", "models/post"):
        assert (run / stage / "manifest.json").exists(), stage
    assert not (run / "models" / "cpt_moe" / "manifest.json").exists()

    again = subprocess.run(_command(path), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = {line.split()[0]: line for line in again.stdout.splitlines()
             if line.startswith("  ") and "(" in line}
    for stage in ("world", "post", "data", "moe_init"):
        assert "skipped (manifest matches)" in lines[stage], again.stdout
    assert "built" in lines["cpt_moe"], again.stdout
    starts = [json.loads(line) for line in
              next(checkpoints.glob("*/starts.jsonl")).read_text().splitlines()]
    assert starts[0]["resumed_from"] is None and starts[-1]["resumed_from"] >= 5
    manifest = json.loads((run / "models" / "cpt_moe" / "manifest.json").read_text())
    review = yaml.safe_load(path.read_text())["train"]["review"]  # the demo reviews routers
    assert manifest["extra"]["train"]["steps"] == 60 + (review["steps"] if review["enabled"] else 0)
