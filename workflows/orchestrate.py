"""Walk the DAG on Ray: every node whose inputs are complete starts as a Ray task, placed by
the resources its kind declares; the driver only waits and records.

This is the whole scheduler: a dependency walk over :func:`ray.wait`. Ray decides where and
how many tasks run at once (``resources.max_parallel`` caps it); a node runs its stage function
inside the task, so models, tensors and token streams stay on the node that works on them. A
failing node blocks only its dependants: independent branches finish, and the outcome of every
node is returned for the summary (a rerun builds only what is missing, since every stage skips
itself when its manifest matches). Even the tables and the report are tasks: the driver's memory
stays what it is whatever the run builds.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from components.config import RunConfig, StageResources
from components.storage import RunDir, placement
from components.tracking import ExpansionTracker, RankZeroLogger, StageRuns
from workflows.plan import Node

__all__ = ["Outcome", "run_nodes", "task_options"]

log = logging.getLogger(__name__)

State = Literal["built", "skipped", "failed", "blocked", "not selected"]


@dataclass
class Outcome:
    """What became of one node."""

    state: State
    seconds: float = 0.0
    detail: str = ""
    placement: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("built", "skipped", "not selected")

    def line(self) -> str:
        return {"built": "built", "skipped": "skipped (manifest matches)",
                "not selected": "not selected", "blocked": f"blocked ({self.detail})",
                "failed": f"FAILED: {self.detail}"}[self.state]


def _defaults(kind: str, cfg: RunConfig) -> dict[str, float]:
    """CPUs and GPUs a task of ``kind`` takes unless ``resources.stages.<kind>`` says.

    Training under the ``ray`` launcher only waits for its Ray Train workers (they hold the
    resources); inline it is one rank in the task, spawned it is ``num_workers`` processes.
    Evaluation takes a GPU when the run uses GPUs. Data takes none: it coordinates Ray Data,
    whose operators ask for their own."""
    r = cfg.resources
    if kind == "train":
        if r.launcher == "ray":
            return {"num_cpus": 0.0, "num_gpus": 0.0}
        workers = 1 if r.launcher == "inline" else r.num_workers
        return {"num_cpus": max(1.0, workers * r.cpus_per_worker),
                "num_gpus": workers * r.gpus_per_worker if r.use_gpu else 0.0}
    if kind == "evaluate":
        return {"num_cpus": 1.0, "num_gpus": 1.0 if r.use_gpu else 0.0}
    if kind == "data":
        return {"num_cpus": 0.0, "num_gpus": 0.0}
    return {"num_cpus": 1.0, "num_gpus": 0.0}


def task_options(kind: str, cfg: RunConfig) -> dict[str, Any]:
    """``ray.remote(...).options`` of a node of ``kind``: defaults, then the config's own."""
    options: dict[str, Any] = _defaults(kind, cfg)
    own: StageResources = getattr(cfg.resources.stages, kind)
    for key in ("num_cpus", "num_gpus", "memory"):
        value = getattr(own, key)
        if value is not None:
            options[key] = value
    if own.resources:
        options["resources"] = dict(own.resources)
    return options


def _execute(node: Node, cfg: RunConfig, run_dir: RunDir, runs: StageRuns, threads: int,
             cwd: str) -> dict[str, Any]:
    """The body of every node's Ray task: bound torch's threads to the task's CPUs (two
    branches on one machine must not each take every core), open the node's MLflow run (its
    start time is when the work starts, not when the task was queued), build the stage."""
    from workflows.logs import quiet_third_party

    quiet_third_party()  # a worker's lm-eval / transformers chatter at WARNING unless -v
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths of the config mean what they meant to the driver
    torch = sys.modules.get("torch")
    if torch is not None:  # a reused worker: torch read its thread count already
        torch.set_num_threads(threads)
    else:  # read when a stage first imports torch; a stage without torch pays nothing
        os.environ["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    run_id = runs.open(node.name)
    logger = RankZeroLogger(runs.tracking_uri, run_id, rank=0)
    _, built = node.work(cfg, run_dir, logger)
    return {"built": built, "started_at": started, "finished_at": time.time(),
            "placement": placement(), "run_id": run_id}


def _cause(err: BaseException) -> BaseException:
    """The stage's own exception inside a RayTaskError (its type decides the exit status)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _finish(tracker: ExpansionTracker, run_id: str, ok: bool,
            finished_at: float | None = None) -> None:
    tracker.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED",
                                  end_time=int((finished_at or time.time()) * 1000))


def run_nodes(nodes: list[Node], cfg: RunConfig, run_dir: RunDir, tracker: ExpansionTracker,
              selected: set[str]) -> dict[str, Outcome]:
    """Run the ``selected`` nodes of ``nodes`` (topologically ordered) on the connected Ray
    instance; every node's outcome, in the order of ``nodes``."""
    import ray

    remote = ray.remote(max_retries=0)(_execute)
    limit = cfg.resources.max_parallel or math.inf
    outcomes: dict[str, Outcome] = {n.name: Outcome("not selected") for n in nodes
                                    if n.name not in selected}
    waiting = [n for n in nodes if n.name in selected]
    total = len(waiting)
    running: dict[Any, tuple[Node, float]] = {}
    cwd = os.getcwd()
    runs = tracker.stage_runs()

    evaluations = [n.name for n in waiting if n.kind == "evaluate"]

    def record(node: Node, outcome: Outcome) -> None:
        outcomes[node.name] = outcome
        done = sum(1 for n in nodes if n.name in selected and n.name in outcomes)
        where = outcome.placement.get("node_id", "")
        what = node.name
        if node.name in evaluations:  # "evaluate 3/6 deltamoe": how far the variants are
            evaluated = sum(1 for n in evaluations if n in outcomes)
            what = f"evaluate {evaluated}/{len(evaluations)} {node.name.removeprefix('eval_')}"
        log.info("stage %d/%d %s: %s%s", done, total, what, outcome.line(),
                 f" ({outcome.seconds:.1f} s{', node ' + where[:8] if where else ''})"
                 if outcome.state in ("built", "skipped") else "")

    while waiting or running:
        progressed = False
        for node in list(waiting):
            needs = [outcomes.get(d) for d in node.needs]
            bad = [d for d, o in zip(node.needs, needs, strict=True) if o and not o.ok]
            if bad:
                waiting.remove(node)
                record(node, Outcome("blocked", detail=f"needs {', '.join(bad)}"))
                continue
            if any(o is None for o in needs) or len(running) >= limit:
                continue
            waiting.remove(node)
            progressed = True
            options = task_options(node.kind, cfg)
            threads = max(1, int(options.get("num_cpus") or 1))
            ref = remote.options(name=node.name, **options).remote(
                node, cfg, run_dir, runs, threads, cwd)
            running[ref] = (node, time.time())
        if not running:
            if not progressed:  # only needs outside the plan are left: never wait forever
                for node in waiting:
                    record(node, Outcome("blocked", detail="needs a stage outside the plan"))
                waiting.clear()
            continue
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            node, launched = running.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as err:  # the stage failed: its dependants are blocked
                cause = _cause(err)
                _finish(tracker, tracker.stage_run_id(node.name), ok=False)
                record(node, Outcome("failed", seconds=time.time() - launched,
                                     detail=_first_line(cause), error=cause))
                continue
            _finish(tracker, info["run_id"], ok=True, finished_at=info["finished_at"])
            record(node, Outcome("built" if info["built"] else "skipped",
                                 seconds=info["finished_at"] - info["started_at"],
                                 placement=info["placement"], started_at=info["started_at"],
                                 finished_at=info["finished_at"]))
    return {n.name: outcomes[n.name] for n in nodes}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def failures(outcomes: Mapping[str, Outcome]) -> dict[str, BaseException]:
    """The nodes that failed, with their exceptions."""
    return {name: o.error for name, o in outcomes.items()
            if o.state == "failed" and o.error is not None}
