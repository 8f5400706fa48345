"""An in-memory Ray job server and a cluster-ready working dir, shared by the submission tests.

The job server double keeps jobs by submission id exactly as Ray's does (``submit_job`` with a
used id raises, ``get_job_info`` of an unknown id raises a 404 error) and records every argument
``submit_job`` got; tests move a job to another status with :meth:`Jobs.finish`. The real server
is exercised by tests/test_submit_ray.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from workflows.cli import DEMO_CONFIG


class Jobs:
    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None,
                   runtime_env: dict | None = None, metadata: dict | None = None,
                   **resources: Any) -> str:
        assert submission_id is not None
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.jobs[submission_id] = {"entrypoint": entrypoint, "runtime_env": runtime_env,
                                    "metadata": metadata, "resources": resources,
                                    "status": "PENDING"}
        return submission_id

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        if job_id not in self.jobs:
            raise RuntimeError("Request failed with status code 404: Job does not exist.")
        return SimpleNamespace(message="", **self.jobs[job_id])

    def finish(self, sid: str, status: str) -> None:
        self.jobs[sid]["status"] = status


def no_mlflow(plan: Any, sid: str) -> None:
    """A ``register`` that skips the MLflow parent run (tests that are not about it)."""
    return None


def cluster_config(folder: Path, *, own_code: bool = True, **changes: Any) -> Path:
    """The demo config written under ``folder/configs/demo.yaml`` with what a cluster needs: an
    absolute storage root and a tracking store outside the run directory.

    With ``own_code`` the folder also holds a stub ``components`` package, so the code version
    of a submission from it hashes that stub, not the checkout (which may change between two
    submissions of one test while the checkout is being edited)."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["storage"]["root"] = str(folder / "shared" / "runs")
    cfg["tracking"]["uri"] = f"sqlite:///{folder / 'shared' / 'mlflow.db'}"
    for key, value in changes.items():
        cfg[key] = value
    if own_code:
        (folder / "components").mkdir(parents=True, exist_ok=True)
        (folder / "components" / "stub.py").write_text("STUB = 1\n")
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    path = folder / "configs" / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
