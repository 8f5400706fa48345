"""MLflow layout of an expansion run: one parent run, one nested run per stage.

Every rerun of the same ``run_name`` reattaches to the same parent and stage runs instead of
creating new ones, so a resumed workflow (or a restarted Ray worker) keeps one continuous history.
Workers log through :class:`RankZeroLogger`, which holds only strings (it pickles into Ray tasks)
and writes from rank 0 alone. Checkpoints of many GB are recorded as external model references
(URI + per-file sha256), never uploaded. Params are the flattened config with every value whose
key looks like a secret redacted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_PARENT_RUN_ID

from components.config import SECRET_KEY, SECRET_MASK, ConfigError
from components.storage import Manifest, RunDir

__all__ = [
    "REDACTED",
    "ExpansionTracker",
    "RankZeroLogger",
    "flatten_params",
    "resolve_tracking_uri",
]

log = logging.getLogger(__name__)

REDACTED = "***REDACTED***"
_TAG_RUN = "deltamoe.run_name"
_TAG_KIND = "deltamoe.kind"
_TAG_STAGE = "deltamoe.stage"
_TAG_CONFIG_FP = "deltamoe.config_fingerprint"
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys → strings, secrets redacted by key name and by pydantic's mask."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, path))
            continue
        if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            flat.update(flatten_params({str(i): v for i, v in enumerate(value)}, path))
            continue
        if SECRET_KEY.search(str(key)) and value not in (None, "", {}):
            flat[path] = REDACTED
            continue
        if value == SECRET_MASK:
            flat[path] = REDACTED
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[path] = text[:_MAX_PARAM_VALUE]
    return flat


def resolve_tracking_uri(configured: str | None, run_dir: RunDir) -> str:
    """``MLFLOW_TRACKING_URI`` wins, then the config, then a SQLite store inside the run dir.

    Set explicitly every time: MLflow's own default depends on the current directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    local = run_dir.local_path
    if local is None:
        raise ConfigError([("tracking.uri",
                            f"the run directory {run_dir.uri} is not local, so no SQLite store "
                            "can live there; set tracking.uri or MLFLOW_TRACKING_URI to a "
                            "tracking server")])
    return f"sqlite:///{local / 'mlflow.db'}"


def _default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite store; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").as_uri()
    return None


class ExpansionTracker:
    """Parent run of one expansion, and its stage runs; reattaches on every rerun."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 tags: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.run_name = run_name
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_default_artifact_location(tracking_uri))
        else:
            self.experiment_id = found.experiment_id
        self.parent_run_id = self._find_or_create(
            filter_string=(f"tags.`{_TAG_RUN}` = '{run_name}' "
                           f"and tags.`{_TAG_KIND}` = 'expansion'"),
            name=run_name,
            tags={_TAG_RUN: run_name, _TAG_KIND: "expansion", **(tags or {})},
        )

    def _find_or_create(self, filter_string: str, name: str, tags: Mapping[str, str]) -> str:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time ASC"], max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, run_name=name,
                                      tags=dict(tags)).info.run_id

    def log_config(self, config: Mapping[str, Any], config_fingerprint: str) -> None:
        """Params = the flattened config. MLflow params are immutable, so a rerun with a changed
        config keeps the first values as params and records the new config as an artifact."""
        params = flatten_params(config)
        existing = self.client.get_run(self.parent_run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        items = [Param(k, v) for k, v in fresh.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.parent_run_id, params=items[start:start + _BATCH])
        self.client.set_tag(self.parent_run_id, _TAG_CONFIG_FP, config_fingerprint)
        redacted = {k: params[k] for k in sorted(params)}
        self.client.log_dict(self.parent_run_id, redacted,
                             f"config/{config_fingerprint[:12]}.json")
        if changed:
            log.warning("config changed since this run was first tracked (%s); MLflow params "
                        "keep the first values, the new config is in config/%s.json",
                        ", ".join(changed), config_fingerprint[:12])

    def stage_run_id(self, stage: str) -> str:
        """The nested run of ``stage`` under this expansion, created on first use."""
        return self._find_or_create(
            filter_string=(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' "
                           f"and tags.`{_TAG_STAGE}` = '{stage}'"),
            name=stage,
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, _TAG_STAGE: stage,
                  _TAG_RUN: self.run_name, _TAG_KIND: "stage"},
        )

    @contextmanager
    def stage(self, stage: str) -> Iterator[RankZeroLogger]:
        """Run a stage inside its nested MLflow run; FAILED on error, FINISHED otherwise."""
        run_id = self.stage_run_id(stage)
        logger = RankZeroLogger(self.tracking_uri, run_id, rank=0)
        try:
            yield logger
        except BaseException:
            self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
            raise
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def finish(self, failed: bool = False) -> None:
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        self.client.set_terminated(self.parent_run_id, status=RunStatus.to_string(status))


def _current_rank() -> int:
    """World rank inside Ray Train or torchrun; 0 in a plain process."""
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # not inside a Ray Train worker
        return int(os.environ.get("RANK", "0"))


class RankZeroLogger:
    """Logs into one MLflow run from any process; only rank 0 writes.

    Holds the tracking URI and run id only, so it pickles into Ray workers; after a worker
    restart the new process builds a fresh client for the same run id, which is what keeps a
    restarted training one continuous MLflow run.
    """

    def __init__(self, tracking_uri: str, run_id: str, rank: int | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._rank = rank
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_rank": None,
                "_client": None}

    @property
    def rank(self) -> int:
        if self._rank is None:
            self._rank = _current_rank()
        return self._rank

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.is_rank_zero or not metrics:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.is_rank_zero or not params:
            return
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in flatten_params(params).items() if k not in existing]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.is_rank_zero and tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.is_rank_zero:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_external_model(self, name: str, uri: str, manifest: Manifest,
                           model_type: str = "hf-checkpoint") -> str | None:
        """Record a checkpoint that stays where it is: a LoggedModel flagged external, tagged with
        its URI and size, plus ``models/<name>.json`` listing every file with its sha256."""
        if not self.is_rank_zero:
            return None
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(
            experiment_id=experiment_id, name=name, source_run_id=self.run_id,
            model_type=model_type,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "uri": uri,
                  "fingerprint": manifest.fingerprint, "total_bytes": str(manifest.total_bytes)},
        )
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_dict(self.run_id, {
            "name": name, "uri": uri, "fingerprint": manifest.fingerprint,
            "model_id": model.model_id,
            "files": [vars(o) for o in manifest.outputs],
        }, f"models/{name}.json")
        return model.model_id
