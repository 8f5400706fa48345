"""The expansion workflow: every stage of a run in order, one command (``deltamoe run CONFIG``).

data → upcycle → CPT (MoE) → graft → baselines → evaluate → report, preceded on a synthetic-world
run by the stages that make the world's own model pair (the world, a base pre-trained on the
original languages, and its post-trained sibling). Each stage writes an atomic folder with a
manifest and is skipped when that manifest matches, so killing the workflow anywhere and running
the same command again resumes at the first stage that is not complete. MLflow holds one parent
run per expansion with a child run per stage (and per baseline variant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.config import RunConfig
from components.storage import Manifest, RunDir, fingerprint
from components.tracking import ExpansionTracker, RankZeroLogger, resolve_tracking_uri

log = logging.getLogger(__name__)

SKIPPED = "skipped (manifest matches)"

# Baseline variants (config ``baselines.variants``) → the models they leave in ``models/``.
MERGES = ("param_delta", "task_arithmetic", "ties", "dare")


@dataclass
class Context:
    """What every stage gets: the config, the run directory and the MLflow tracker."""

    cfg: RunConfig
    run_dir: RunDir
    tracker: ExpansionTracker
    models: dict[str, str] = field(default_factory=dict)
    evaluated: dict[str, Any] = field(default_factory=dict)
    report: str | None = None

    def track(self, name: str, build: Callable[[RankZeroLogger], tuple[Manifest, bool]]) -> str:
        """Run ``build`` inside the child run ``name``; the state line for the summary."""
        with self.tracker.stage(name) as logger:
            _, built = build(logger)
        return "built" if built else SKIPPED

    def model(self, variant: str, stage: str) -> None:
        self.models[variant] = f"{self.run_dir.uri}/{stage}"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    applies: Callable[[RunConfig], bool]
    run: Callable[[Context], str]
    gpu: bool = False


def _world(ctx: Context) -> str:
    from workflows.world import ensure_world, log_world

    world = ctx.cfg.world
    assert world is not None
    stage = ctx.run_dir.stage("world")

    def build(logger: RankZeroLogger) -> tuple[Manifest, bool]:
        manifest, built = ensure_world(stage, world)
        log_world(logger, stage, world, manifest, built)
        return manifest, built

    return ctx.track("world", build)


def _base_data(ctx: Context) -> str:
    from workflows.data_stage import ensure_base_data

    return ctx.track("base-data", lambda lg: ensure_base_data(ctx.cfg, ctx.run_dir, lg))


def _base(ctx: Context) -> str:
    from workflows.train_stage import ensure_base

    state = ctx.track("base", lambda lg: ensure_base(ctx.cfg, ctx.run_dir, lg))
    ctx.model("base", "models/base")
    return state


def _post(ctx: Context) -> str:
    from workflows.train_stage import ensure_post

    state = ctx.track("post", lambda lg: ensure_post(ctx.cfg, ctx.run_dir, lg))
    ctx.model("post", "models/post")
    return state


def _data(ctx: Context) -> str:
    from workflows.data_stage import ensure_data

    return ctx.track("data", lambda lg: ensure_data(ctx.cfg, ctx.run_dir, lg))


def _upcycle(ctx: Context) -> str:
    from workflows.upcycle_stage import ensure_upcycled

    return ctx.track("upcycle", lambda lg: ensure_upcycled(ctx.cfg, ctx.run_dir, lg))


def _cpt_moe(ctx: Context) -> str:
    from workflows.train_stage import ensure_trained

    state = ctx.track("cpt-moe", lambda lg: ensure_trained(ctx.cfg, ctx.run_dir, "cpt-moe", lg))
    ctx.model("cpt_moe", "models/cpt-moe")
    return state


def _graft(ctx: Context) -> str:
    from workflows.graft_stage import ensure_grafted

    method = ctx.cfg.graft.method
    state = ctx.track("graft", lambda lg: ensure_grafted(ctx.cfg, ctx.run_dir, method, lg))
    ctx.model(method, f"models/{method}")
    return state


def _variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """The config a MoE baseline trains with: LayerMoE's allocation, or the parameter-matched
    MoE (no language allocation, nothing frozen)."""
    up = cfg.upcycle
    if variant == "layermoe":
        alloc = up.allocation.model_copy(update={"method": "layermoe"})
        return cfg.model_copy(update={"upcycle": up.model_copy(update={"allocation": alloc})})
    alloc = up.allocation.model_copy(update={"method": "none", "experts": {}, "groups": {}})
    freeze = up.freeze.model_copy(update={"anchor_expert": False, "shared": False})
    return cfg.model_copy(update={"upcycle": up.model_copy(
        update={"allocation": alloc, "freeze": freeze})})


def _baselines(ctx: Context) -> str:
    """Each variant the config asks for, each in its own child run and folders; a variant whose
    folders are complete is skipped like any stage."""
    from workflows.graft_stage import ensure_grafted
    from workflows.train_stage import ensure_trained
    from workflows.upcycle_stage import ensure_upcycled

    cfg, run_dir = ctx.cfg, ctx.run_dir
    variants = list(dict.fromkeys(cfg.baselines.variants))
    states = []
    needs_dense = any(v in ("cpt_dense", *MERGES) for v in variants)
    if needs_dense:
        states.append(ctx.track("cpt-dense", lambda lg: ensure_trained(
            cfg, run_dir, "cpt-dense", lg)))
        ctx.model("cpt_dense", "models/cpt-dense")
    for merge in (v for v in variants if v in MERGES):
        states.append(ctx.track(f"graft-{merge}", lambda lg, m=merge: ensure_grafted(
            cfg, run_dir, m, lg)))
        ctx.model(merge, f"models/{merge}")
    if "flops_matched" in variants:
        states.append(ctx.track("cpt-flops-matched", lambda lg: ensure_trained(
            cfg, run_dir, "flops-matched", lg)))
        states.append(ctx.track("graft-flops_matched", lambda lg: ensure_grafted(
            cfg, run_dir, "param_delta", lg, target_stage="models/flops-matched",
            name="flops_matched")))
        ctx.model("flops_matched", "models/flops_matched")
    for variant in (v for v in variants if v in ("param_matched", "layermoe")):
        vcfg = _variant_config(cfg, variant)
        init, cpt = f"models/moe-init-{variant}", f"models/cpt-moe-{variant}"
        states.append(ctx.track(f"upcycle-{variant}", lambda lg, c=vcfg, s=init: ensure_upcycled(
            c, run_dir, lg, stage_name=s)))
        states.append(ctx.track(f"cpt-{variant}", lambda lg, c=vcfg, v=variant: ensure_trained(
            c, run_dir, f"cpt-moe-{v}", lg)))
        states.append(ctx.track(f"graft-{variant}", lambda lg, c=vcfg, t=cpt, v=variant:
                                ensure_grafted(c, run_dir, "deltamoe", lg, target_stage=t,
                                               name=v)))
        ctx.model(variant, f"models/{variant}")
    if not states:
        return "nothing asked (baselines.variants is empty)"
    built = sum(s == "built" for s in states)
    return f"{len(states)} steps, {built} built, {len(states) - built} skipped"


def _evaluate(ctx: Context) -> str:
    from workflows.evaluate_stage import ensure_evaluated

    ctx.evaluated = ensure_evaluated(ctx.cfg, ctx.run_dir, tracker=ctx.tracker)
    return f"{len(ctx.evaluated)} variants"


def _report(ctx: Context) -> str:
    from dashboards.report import build_report

    with ctx.tracker.stage("report") as logger:
        ctx.report = str(build_report(ctx.cfg, ctx.run_dir, logger=logger))
    return "built"


def _is_world(cfg: RunConfig) -> bool:
    return cfg.models is None and cfg.world is not None


STAGES: tuple[Stage, ...] = (
    Stage("world", "the synthetic world (corpora, instructions, evaluation sets, tiny model)",
          lambda c: c.world is not None, _world),
    Stage("base-data", "pre-training data of the world's original languages",
          lambda c: _is_world(c) and c.world.base_steps > 0, _base_data),
    Stage("base", "the world's base: its tiny model pre-trained on the original languages",
          lambda c: _is_world(c) and c.world.base_steps > 0, _base, gpu=True),
    Stage("post", "the post-trained sibling: the base fine-tuned on instruction data",
          _is_world, _post, gpu=True),
    Stage("data", "read, language-tag, filter, dedup, tokenize, pack and mix the corpora",
          lambda c: True, _data),
    Stage("upcycle", "dense base → language-allocated MoE", lambda c: True, _upcycle),
    Stage("cpt-moe", "continued pre-training of the MoE on the new languages",
          lambda c: True, _cpt_moe, gpu=True),
    Stage("graft", "θ_CPT-MoE + Expand(θ_post − θ_base)", lambda c: True, _graft),
    Stage("baselines", "the comparison variants of baselines.variants",
          lambda c: bool(c.baselines.variants), _baselines, gpu=True),
    Stage("evaluate", "every variant on the evaluation suites", lambda c: True, _evaluate),
    Stage("report", "the HTML report from MLflow", lambda c: True, _report),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


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

    def summary(self) -> str:
        lines = [f"run directory: {self.run_dir}", "stages:"]
        lines += [f"  {name:<10} {state}  ({self.seconds.get(name, 0.0):.1f} s)"
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


def select_stages(cfg: RunConfig, from_stage: str | None = None,
                  only: tuple[str, ...] = ()) -> list[Stage]:
    """The stages to run: those that apply to this config, from ``from_stage`` on, or ``only``."""
    for name in (from_stage, *only):
        if name is not None and name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    chosen = [s for s in STAGES if s.applies(cfg)]
    if only:
        return [s for s in chosen if s.name in only]
    if from_stage is not None:
        start = STAGE_NAMES.index(from_stage)
        return [s for s in chosen if STAGE_NAMES.index(s.name) >= start]
    return chosen


def init_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster (or start a local instance) once for every stage;
    True when this call connected (the caller then owns the connection)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.resources.ray_address
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def run_workflow(cfg: RunConfig, *, from_stage: str | None = None,
                 only: tuple[str, ...] = ()) -> WorkflowResult:
    """Run (or resume) the expansion; a failing stage marks its MLflow runs FAILED and raises."""
    stages = select_stages(cfg, from_stage, only)
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, run_dir)
    tracker = ExpansionTracker(tracking_uri, cfg.tracking.experiment, cfg.run_name,
                               tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    ctx = Context(cfg, run_dir, tracker)
    result = WorkflowResult(run_dir=run_dir.uri, tracking_uri=tracking_uri,
                            parent_run_id=tracker.parent_run_id)
    owns_ray = False
    if any(s.name not in ("world", "upcycle", "evaluate", "report") for s in stages):
        owns_ray = init_ray(cfg)
    try:
        for stage in stages:
            log.info("stage %s: %s", stage.name, stage.help)
            started = time.perf_counter()
            result.stages[stage.name] = stage.run(ctx)
            result.seconds[stage.name] = time.perf_counter() - started
            log.info("stage %s: %s in %.1f s", stage.name, result.stages[stage.name],
                     result.seconds[stage.name])
    except BaseException:
        tracker.finish(failed=True)
        raise
    finally:
        if owns_ray:  # a local instance this run started (or a connection it opened) ends here
            import ray

            ray.shutdown()
    tracker.finish()
    result.models = ctx.models
    result.report = ctx.report
    result.evaluated = dict(ctx.evaluated or {})
    if ctx.evaluated:
        from workflows.evaluate_stage import comparison_table

        result.table = comparison_table(ctx.cfg, ctx.evaluated)
    return result
