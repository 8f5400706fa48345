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
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_MODEL_IS_EXTERNAL,
    MLFLOW_MODEL_VERSIONS,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
)

from components.config import SECRET_KEY, SECRET_MASK, ConfigError, mask_secrets
from components.storage import Manifest, RunDir

__all__ = [
    "REDACTED",
    "ExpansionTracker",
    "RankZeroLogger",
    "StageRuns",
    "code_version",
    "flatten_params",
    "parquet_dataset",
    "resolve_tracking_uri",
]

log = logging.getLogger(__name__)

REDACTED = "***REDACTED***"
_TAG_RUN = "deltamoe.run_name"
_TAG_KIND = "deltamoe.kind"
_TAG_STAGE = "deltamoe.stage"
_TAG_CONFIG_FP = "deltamoe.config_fingerprint"
_TAG_VERSION = "deltamoe.version"
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


@cache
def code_version() -> dict[str, str]:
    """Tags that say which code made a run: the package version, and the git commit of the
    checkout it runs from (``-dirty`` when it has uncommitted changes) where there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {_TAG_VERSION: version("deltamoe")}
    except PackageNotFoundError:
        tags = {_TAG_VERSION: "unknown"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an install)
        return tags
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit + ("-dirty" if dirty else "")
    return tags


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
            tags={_TAG_RUN: run_name, _TAG_KIND: "expansion", **code_version(), **(tags or {})},
        )

    def _find_or_create(self, filter_string: str, name: str, tags: Mapping[str, str]) -> str:
        return _find_or_create(self.client, self.experiment_id, filter_string, name, tags)

    def stage_runs(self) -> StageRuns:
        """What a worker needs to open its own stage run when its work starts (picklable)."""
        return StageRuns(self.tracking_uri, self.experiment_id, self.parent_run_id,
                         self.run_name)

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
        # the resolved config as a user would write it: what a rerun elsewhere starts from
        self.client.log_text(self.parent_run_id, yaml.safe_dump(
            _redact(config), sort_keys=False, allow_unicode=True), "config/resolved.yaml")
        if changed:
            log.warning("config changed since this run was first tracked (%s); MLflow params "
                        "keep the first values, the new config is in config/%s.json",
                        ", ".join(changed), config_fingerprint[:12])

    def stage_run_id(self, stage: str) -> str:
        """The nested run of ``stage`` under this expansion, created on first use."""
        return self.stage_runs().open(stage, self.client)

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


def _find_or_create(client: MlflowClient, experiment_id: str, filter_string: str, name: str,
                    tags: Mapping[str, str]) -> str:
    """The first run matching ``filter_string`` (set RUNNING again), else a new one starting
    now."""
    runs = client.search_runs([experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time ASC"], max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    return client.create_run(experiment_id, run_name=name, tags=dict(tags)).info.run_id


@dataclass(frozen=True)
class StageRuns:
    """The stage runs of one expansion, opened by name from any process. A Ray task opens its
    own when its work starts, so the run's start time is when the work began, not when the task
    was queued."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_name: str

    def open(self, stage: str, client: MlflowClient | None = None) -> str:
        """The run id of ``stage``, created on first use, reattached on every rerun."""
        return _find_or_create(
            client or MlflowClient(self.tracking_uri), self.experiment_id,
            filter_string=(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' "
                           f"and tags.`{_TAG_STAGE}` = '{stage}'"),
            name=stage,
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, _TAG_STAGE: stage,
                  _TAG_RUN: self.run_name, _TAG_KIND: "stage", **code_version()})


def _redact(data: Any) -> Any:
    """``data`` with secret-looking keys and pydantic-masked values replaced, at any depth."""
    if isinstance(data, Mapping):
        masked = mask_secrets(dict(data))
        return {k: REDACTED if v == SECRET_MASK else _redact(v) for k, v in masked.items()}
    if isinstance(data, list):
        return [_redact(v) for v in data]
    return REDACTED if data == SECRET_MASK else data


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

    def log_metrics(self, metrics: Mapping[str, float], step: int,
                    model_id: str | None = None) -> None:
        """Metrics of this run; with ``model_id`` also of that LoggedModel (its page lists
        them)."""
        if not self.is_rank_zero or not metrics:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()]
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
        run = self.client.get_run(self.run_id)
        model = self.client.create_logged_model(
            experiment_id=run.info.experiment_id, name=name, source_run_id=self.run_id,
            model_type=model_type,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "uri": uri,
                  "fingerprint": manifest.fingerprint, "total_bytes": str(manifest.total_bytes),
                  _TAG_RUN: run.data.tags.get(_TAG_RUN, "")},
        )
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_dict(self.run_id, {
            "name": name, "uri": uri, "fingerprint": manifest.fingerprint,
            "model_id": model.model_id,
            "files": [vars(o) for o in manifest.outputs],
        }, f"models/{name}.json")
        return model.model_id

    def variant_model(self, name: str, uri: str, lineage: Mapping[str, str]) -> str | None:
        """The id of the newest LoggedModel ``name`` of this expansion (what its build stage
        recorded), or a new external reference to ``uri`` when none was (a hub base, a model
        made elsewhere); ``lineage`` (base, post, target, data) becomes its ``lineage.*``
        params, so the model page says where the model came from."""
        if not self.is_rank_zero:
            return None
        run = self.client.get_run(self.run_id)
        expansion = run.data.tags.get(_TAG_RUN, "")
        found = self.client.search_logged_models(
            [run.info.experiment_id],
            filter_string=f"name = '{name}' AND tags.`{_TAG_RUN}` = '{expansion}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
        if found:
            model_id = found[0].model_id
        else:
            model = self.client.create_logged_model(
                experiment_id=run.info.experiment_id, name=name, source_run_id=self.run_id,
                model_type="hf-causal-lm",
                tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "uri": uri, _TAG_RUN: expansion})
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            model_id = model.model_id
        # params, not tags: the model page shows its params (a model's lineage never changes;
        # a rebuilt model is a new LoggedModel)
        known = self.client.get_logged_model(model_id).params
        fresh = {f"lineage.{k}": str(v)[:_MAX_PARAM_VALUE] for k, v in lineage.items()
                 if f"lineage.{k}" not in known}
        if fresh:
            self.client.log_model_params(model_id, fresh)
        return model_id

    def register_model(self, registered_name: str, model_id: str, uri: str,
                       alias: str = "candidate") -> int | None:
        """A new version of ``registered_name`` in the Model Registry pointing at ``uri`` (the
        weights stay where they are), tagged with its LoggedModel, and ``alias`` moved to it;
        the version number."""
        if not self.is_rank_zero:
            return None
        try:
            self.client.create_registered_model(
                registered_name, description="DeltaMoE expansions: an instruct model with new "
                "languages, its weights referenced where the run wrote them")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            registered_name, source=uri, run_id=self.run_id, model_id=model_id,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", "model_id": model_id, "uri": uri})
        self.client.set_registered_model_alias(registered_name, alias, version.version)
        # the LoggedModel's page lists its registered versions from this tag (what
        # mlflow.register_model writes; the SQL registry does not keep the model id itself)
        linked = json.loads(self.client.get_logged_model(model_id).tags.get(
            MLFLOW_MODEL_VERSIONS, "[]"))
        linked.append({"name": registered_name, "version": version.version})
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
        return int(version.version)

    def log_dataset(self, name: str, source: str, digest: str, *, profile: Mapping[str, Any],
                    schema: Mapping[str, Any], context: str = "training") -> None:
        """Record data this run read as an MLflow dataset input (name, source URI, digest,
        profile: rows and tokens per language), not the rows themselves."""
        if not self.is_rank_zero:
            return
        dataset = Dataset(name=name, digest=digest[:36], source_type="local" if
                          source.startswith(("/", "file:")) else "external", source=source,
                          schema=json.dumps(schema), profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(
            dataset, tags=[InputTag("mlflow.data.context", context)])])

    def log_parent_summary(self, metrics: Mapping[str, float], description: str) -> None:
        """Headline metrics and a description (the run page's note) on this run's parent."""
        if not self.is_rank_zero:
            return
        parent = self.client.get_run(self.run_id).data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent is None:
            return
        self.client.set_tag(parent, MLFLOW_RUN_NOTE, description)
        RankZeroLogger(self.tracking_uri, parent, rank=0).log_metrics(metrics, step=0)


def parquet_dataset(paths: list[str], name: str = "training-data") -> dict[str, Any]:
    """What :meth:`RankZeroLogger.log_dataset` records of packed parquet files: their folder,
    a digest of their names and sizes, rows and tokens per language, and the columns — read from
    the parquet footers and the ``lang`` column alone, never the token streams."""
    import hashlib

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    rows: dict[str, int] = {}
    schema: dict[str, str] = {}
    seq_len = 0
    for path in sorted(paths):
        digest.update(f"{Path(path).name}:{os.path.getsize(path)}\n".encode())
        file = pq.ParquetFile(path)
        schema = {f.name: str(f.type) for f in file.schema_arrow}
        counts = pc.value_counts(file.read(columns=["lang"]).column("lang")).to_pylist()
        for item in counts:
            rows[item["values"]] = rows.get(item["values"], 0) + int(item["counts"])
        if not seq_len and file.metadata.num_rows:
            seq_len = len(file.read_row_group(0, columns=["input_ids"]).column(0)[0])
    parents = {str(Path(p).resolve().parent) for p in paths}
    source = os.path.commonpath(sorted(parents)) if parents else ""
    return {"name": name, "source": source, "digest": digest.hexdigest(),
            "schema": {"columns": schema},
            "profile": {"files": len(paths), "rows": sum(rows.values()), "seq_len": seq_len,
                        "rows_per_language": rows,
                        "tokens_per_language": {k: v * seq_len for k, v in rows.items()}}}
