"""The expansion workflow: every stage of a run as a DAG on Ray, one command (``deltamoe run``).

The plan (:mod:`workflows.plan`) lists the stages a config asks for, the orchestrator
(:mod:`workflows.orchestrate`) starts each as a Ray task once its inputs are complete, where its
resources are; this module ties them to the run directory and MLflow. Each stage writes an atomic
folder with a manifest and is skipped when that manifest matches, so killing the workflow
anywhere and running the same command again resumes with what is missing. MLflow holds one
parent run per expansion with a child run per stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import ConfigError, RunConfig
from components.storage import RunDir, fingerprint
from components.tracking import ExpansionTracker, resolve_tracking_uri
from workflows.orchestrate import Outcome, failures, run_nodes
from workflows.plan import Node, plan, select

log = logging.getLogger(__name__)

@dataclass
class WorkflowResult:
    run_dir: str
    tracking_uri: str
    parent_run_id: str
    stages: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    table: str | None = None
    report: str | None = None
    evaluated: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"run directory: {self.run_dir}", "stages:"]
        lines += [f"  {name:<22} {state}  ({self.seconds.get(name, 0.0):.1f} s)"
                  for name, state in self.stages.items()]
        if self.models:
            lines.append("models:")
            lines += [f"  {name:<14} {path}" for name, path in self.models.items()]
        if self.table:
            lines += ["", self.table, ""]
        if self.report:
            lines.append(f"report: {self.report}")
        lines.append(f"MLflow run {self.parent_run_id} in {self.tracking_uri}")
        if self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"browse: mlflow ui --backend-store-uri {self.tracking_uri} "
                         "--host 127.0.0.1 --workers 1")
        return "\n".join(lines)


class WorkflowError(RuntimeError):
    """Some stages failed; ``result`` holds every stage's state. ``user_error`` when each
    failure was bad input (a config, a model, a path), not a bug or the machine."""

    def __init__(self, result: WorkflowResult, errors: dict[str, BaseException],
                 user_error: bool) -> None:
        self.result = result
        self.errors = errors
        self.user_error = user_error
        failed = ", ".join(errors)
        super().__init__(f"{len(errors)} stage(s) failed ({failed}):\n" + "\n".join(
            f"  {name}: {type(err).__name__}: {err}" for name, err in errors.items()))


def user_error_types() -> tuple[type[BaseException], ...]:
    """The stages' errors that mean bad input (a config, a model, a path), not a bug or the
    machine: the CLI shows them as one line and exits 2."""
    from components.data.errors import DataError
    from components.delta.graft import GraftError
    from components.evaluate.suites import SuiteError
    from components.moe.families import UnknownTensorError, UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError
    from components.train.spec import TrainError

    return (UpcycleError, UnsupportedArchitectureError, UnknownTensorError, GraftError,
            TrainError, DataError, SuiteError, FileNotFoundError)


def refuse_ephemeral_root(cfg: RunConfig, cwd: str | None = None) -> None:
    """Inside a Ray job's working-directory copy a relative ``storage.root`` would put the run
    (and its MLflow store) in a folder Ray deletes and renames with the code: refuse it there,
    whoever submitted the job (``deltamoe submit`` checks before sending; stock ``ray job
    submit`` and a variable left to the cluster do not)."""
    import fsspec

    here = cwd or os.getcwd()
    protocol = fsspec.core.split_protocol(cfg.storage.root)[0]
    if "/runtime_resources/working_dir_files/" not in here or protocol not in (None, "file"):
        return
    if not Path(cfg.storage.root.removeprefix("file://")).expanduser().is_absolute():
        raise ConfigError([("storage.root", (
            f"{cfg.storage.root!r} is relative and this job runs in Ray's temporary copy of its "
            f"working dir ({here}): the results would be deleted with it; set storage.root (or "
            "DELTAMOE_RUNS) to a path every node shares or an object-store URI, and "
            "MLFLOW_TRACKING_URI to a tracking server"))])


def refuse_unreadable_suites(cfg: RunConfig) -> None:
    """A suite that reads only local files needs ``evaluation.data_dir``: say so before Ray
    starts and any stage runs, not when the evaluation of a finished expansion reaches it.
    (The config itself may leave it unset: ``deltamoe evaluate --data-dir`` fills it in.)"""
    from components.evaluate.suites import SuiteError, require_data_dir

    try:
        require_data_dir(cfg.evaluation.suites, cfg.evaluation.data_dir)
    except SuiteError as err:
        raise ConfigError([("evaluation.data_dir", str(err))]) from None


def select_stages(cfg: RunConfig, from_stage: str | None = None,
                  only: tuple[str, ...] = ()) -> list[Node]:
    """The nodes to run: those that apply to this config, from ``from_stage`` on, or ``only``
    (a node name or a group; ``-`` and ``_`` are the same)."""
    nodes = plan(cfg)
    chosen = select(nodes, from_stage, only)
    return [n for n in nodes if n.name in chosen]


def init_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster (or start a local instance) once for every stage;
    True when this call connected (the caller then owns the connection). Without an address a
    job's driver joins its cluster (Ray sets ``RAY_ADDRESS`` for it); anywhere else a new local
    instance starts, never a cluster someone else left running on the machine."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def _tracker(cfg: RunConfig, run_dir: RunDir) -> ExpansionTracker:
    tracker = ExpansionTracker(resolve_tracking_uri(cfg.tracking.uri, run_dir),
                               cfg.tracking.experiment, cfg.run_name, tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    return tracker


def _walk(cfg: RunConfig, run_dir: RunDir, tracker: ExpansionTracker, nodes: list[Node],
          chosen: set[str]) -> dict[str, Outcome]:
    owns_ray = init_ray(cfg)
    try:
        return run_nodes(nodes, cfg, run_dir, tracker, chosen)
    except BaseException:
        tracker.finish(failed=True)
        raise
    finally:
        if owns_ray:  # a local instance this run started (or a connection it opened) ends here
            import ray

            ray.shutdown()


def _result(cfg: RunConfig, run_dir: RunDir, tracker: ExpansionTracker, nodes: list[Node],
            outcomes: dict[str, Outcome],
            user_errors: tuple[type[BaseException], ...]) -> WorkflowResult:
    """The summary of a walk; raises :class:`WorkflowError` when any node failed."""
    result = WorkflowResult(run_dir=run_dir.uri, tracking_uri=tracker.tracking_uri,
                            parent_run_id=tracker.parent_run_id, outcomes=outcomes)
    ran = {name: o for name, o in outcomes.items() if o.state != "not selected"}
    result.stages = {name: o.line() for name, o in ran.items()}
    result.seconds = {name: o.seconds for name, o in ran.items()}
    result.models = {n.model: f"{run_dir.uri}/models/{n.model}" for n in nodes
                     if n.model and outcomes[n.name].ok}
    if outcomes.get("report") is not None and outcomes["report"].state == "built":
        result.report = f"{run_dir.uri}/report/index.html"
    if any(n.name == "evaluate" for n in nodes):
        from workflows.evaluate_stage import EVAL_STAGE, comparison_table, read_evaluated

        assembled = run_dir.stage(EVAL_STAGE).read_manifest()
        shown = assembled.extra.get("variants", []) if assembled is not None and \
            outcomes["evaluate"].ok else assembled_variants(nodes)
        result.evaluated = read_evaluated(run_dir, shown)
        if result.evaluated:
            result.table = comparison_table(cfg, result.evaluated)
    errors = failures(outcomes)
    tracker.finish(failed=bool(errors))
    if errors:
        raise WorkflowError(result, errors, all(isinstance(e, user_errors)
                                                for e in errors.values()))
    return result


def run_workflow(cfg: RunConfig, *, from_stage: str | None = None, only: tuple[str, ...] = (),
                 user_errors: tuple[type[BaseException], ...] | None = None) -> WorkflowResult:
    """Run (or resume) the expansion as a DAG; raises :class:`WorkflowError` (after every
    independent branch has finished) when any stage failed."""
    refuse_ephemeral_root(cfg)
    nodes = plan(cfg)
    chosen = select(nodes, from_stage, only)
    if any(n.kind == "evaluate" for n in nodes if n.name in chosen):
        refuse_unreadable_suites(cfg)
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracker = _tracker(cfg, run_dir)
    outcomes = _walk(cfg, run_dir, tracker, nodes, chosen)
    return _result(cfg, run_dir, tracker, nodes, outcomes, user_errors or user_error_types())


def run_evaluation(cfg: RunConfig, *,
                   user_errors: tuple[type[BaseException], ...] | None = None) -> WorkflowResult:
    """Evaluate every variant the run has built (``deltamoe evaluate``): one task per variant
    where the evaluation resources are, then the tables."""
    from workflows.evaluate_stage import discover_variants
    from workflows.plan import evaluation_nodes

    refuse_unreadable_suites(cfg)
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    found = discover_variants(cfg, run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir.uri}: no model variant to evaluate yet (models/ has "
                                "none with a manifest, and no base model is configured)")
    nodes = evaluation_nodes(found)
    tracker = _tracker(cfg, run_dir)
    outcomes = _walk(cfg, run_dir, tracker, nodes, {n.name for n in nodes})
    return _result(cfg, run_dir, tracker, nodes, outcomes, user_errors or user_error_types())


def assembled_variants(nodes: list[Node]) -> list[str]:
    """The variants the plan evaluates, in table order."""
    return [n.name.removeprefix("eval_") for n in nodes if n.name.startswith("eval_")]
