"""The expansion as a DAG of stages, planned from a run config.

Every stage is a :class:`Node`: what it needs, the kind of resources it runs with
(``resources.stages.<kind>``), and the function that builds (or skips) it. The synthetic world's
own pair comes first when the config has a ``world``: the world, a base pre-trained on its
original languages (``base_data`` → ``base``), its post-trained sibling (``post``). Then
``data`` and the upcycled MoE (``moe_init``), and one branch per variant of
:data:`components.variants.VARIANTS` the run builds — the method's own (``cpt_moe`` →
``deltamoe``) and every baseline — each depending only on what it reads, so branches run at
once. Each variant that exists is evaluated by its own node (``eval_<variant>``), started as soon
as the variant is; ``evaluate`` assembles the tables and plots and ``report`` writes the report
(tasks too: plotting and rendering would otherwise grow the driver).

Node functions take ``(cfg, run_dir, logger)`` and return ``(manifest, built)`` (the report,
rebuilt from MLflow every time, has no manifest); they are
module-level functions bound with :func:`functools.partial`, so a node pickles into a Ray task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from components.config import RunConfig
from components.storage import Manifest, RunDir
from components.tracking import RankZeroLogger
from components.variants import VARIANTS, Variant, graft_target

__all__ = ["GROUPS", "Node", "evaluation_nodes", "plan", "select", "variant_config"]

Kind = Literal["world", "data", "upcycle", "train", "graft", "evaluate", "report"]
Work = Callable[[RunConfig, RunDir, RankZeroLogger], tuple[Manifest | None, bool]]

GROUPS = ("world", "base_data", "base", "post", "data", "upcycle", "cpt_moe", "graft",
          "baselines", "evaluate", "report")
"""What ``--only`` and ``--from`` name besides single nodes, in workflow order."""


@dataclass(frozen=True)
class Node:
    """One stage of the DAG. ``model`` is the ``models/`` folder it leaves, if any."""

    name: str
    kind: Kind
    group: str
    needs: tuple[str, ...]
    work: Work
    help: str
    model: str | None = None


# --------------------------------------------------------------------------- node functions


def _world(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[Manifest, bool]:
    from workflows.world import ensure_world, log_world

    assert cfg.world is not None
    stage = run_dir.stage("world")
    manifest, built = ensure_world(stage, cfg.world)
    log_world(logger, stage, cfg.world, manifest, built)
    return manifest, built


def _base_data(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[Manifest, bool]:
    from workflows.data_stage import ensure_base_data

    return ensure_base_data(cfg, run_dir, logger)


def _base(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[Manifest, bool]:
    from workflows.train_stage import ensure_base

    return ensure_base(cfg, run_dir, logger)


def _post(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[Manifest, bool]:
    from workflows.train_stage import ensure_post

    return ensure_post(cfg, run_dir, logger)


def _data(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[Manifest, bool]:
    from workflows.data_stage import ensure_data

    return ensure_data(cfg, run_dir, logger)


def variant_config(cfg: RunConfig, variant: Variant) -> RunConfig:
    """The config a variant upcycles and trains with: LayerMoE's allocation, or for the
    unallocated MoE no language allocation and nothing frozen; else the run's own."""
    up = cfg.upcycle
    if variant.upcycle == "layermoe":
        alloc = up.allocation.model_copy(update={"method": "layermoe"})
        return cfg.model_copy(update={"upcycle": up.model_copy(update={"allocation": alloc})})
    if variant.upcycle == "unallocated":
        alloc = up.allocation.model_copy(update={"method": "none", "experts": {}, "groups": {}})
        freeze = up.freeze.model_copy(update={"anchor_expert": False, "shared": False})
        return cfg.model_copy(update={"upcycle": up.model_copy(
            update={"allocation": alloc, "freeze": freeze})})
    return cfg


def _upcycle(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger, *,
             variant: str) -> tuple[Manifest, bool]:
    from workflows.upcycle_stage import ensure_expanded, ensure_upcycled

    v = VARIANTS[variant]
    if v.upcycle == "blocks":
        return ensure_expanded(cfg, run_dir, logger, stage_name=f"models/{v.upcycled}")
    return ensure_upcycled(variant_config(cfg, v), run_dir, logger,
                           stage_name=f"models/{v.upcycled}")


def _train(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger, *,
           variant: str) -> tuple[Manifest, bool]:
    from workflows.train_stage import ensure_trained

    return ensure_trained(variant_config(cfg, VARIANTS[variant]), run_dir, variant, logger)


def _graft(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger, *,
           variant: str) -> tuple[Manifest, bool]:
    from workflows.graft_stage import ensure_grafted

    v = VARIANTS[variant]
    return ensure_grafted(cfg, run_dir, v.graft, logger, name=v.name,
                          target_stage=f"models/{graft_target(v)}")


def _evaluate_one(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger, *,
                  variant: str, model_dir: str | None) -> tuple[Manifest, bool]:
    from workflows.evaluate_stage import ensure_variant_evaluated

    return ensure_variant_evaluated(cfg, run_dir, variant, logger,
                                    model_dir=Path(model_dir) if model_dir else None)


def _assemble(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger, *,
              variants: tuple[str, ...]) -> tuple[Manifest, bool]:
    from workflows.evaluate_stage import ensure_assembled

    return ensure_assembled(cfg, run_dir, variants, logger)


def _report(cfg: RunConfig, run_dir: RunDir, logger: RankZeroLogger) -> tuple[None, bool]:
    from dashboards.report import build_report

    build_report(cfg, run_dir, logger=logger)
    return None, True  # rebuilt every time: it reads MLflow, which changes without a manifest


# --------------------------------------------------------------------------- the plan


def _is_world(cfg: RunConfig) -> bool:
    return cfg.models is None and cfg.world is not None


def built_variants(cfg: RunConfig) -> list[str]:
    """The variants this run builds, in registry order: CPT-MoE, the configured graft
    method's variant, and every baseline asked for (with what they graft onto)."""
    wanted = {"cpt_moe", cfg.graft.method, *cfg.baselines.variants}
    for name in list(wanted):
        onto = VARIANTS[name].graft_onto
        if onto is not None:
            wanted.add(onto)
    return [name for name in VARIANTS if name in wanted]


def plan(cfg: RunConfig) -> list[Node]:
    """Every node of the run, in a topological order (the order the summary lists them)."""
    nodes: list[Node] = []
    base_node: tuple[str, ...] = ()
    post_node: tuple[str, ...] = ()
    if cfg.world is not None:
        nodes.append(Node("world", "world", "world", (), _world,
                          "the synthetic world (corpora, instructions, evaluation sets, model)"))
    if _is_world(cfg):
        base_node = ("world",)
        assert cfg.world is not None
        if cfg.world.base_steps > 0:
            nodes.append(Node("base_data", "data", "base_data", ("world",), _base_data,
                              "pre-training data of the world's original languages"))
            nodes.append(Node("base", "train", "base", ("base_data",), _base,
                              "the world's base: its model pre-trained on the original "
                              "languages", model="base"))
            base_node = ("base",)
        nodes.append(Node("post", "train", "post", base_node, _post,
                          "the post-trained sibling: the base fine-tuned on instructions",
                          model="post"))
        post_node = ("post",)
    world = ("world",) if cfg.world is not None else ()
    nodes.append(Node("data", "data", "data", (*world, *base_node), _data,
                      "read, language-tag, filter, dedup, tokenize, pack and mix the corpora"))
    variants = built_variants(cfg)
    upcycles = {VARIANTS[v].upcycled: v for v in variants if VARIANTS[v].upcycle}
    for folder, variant in upcycles.items():
        v = VARIANTS[variant]
        needs = (*base_node, *(("data", *world) if v.upcycle == "layermoe" else ()),
                 *(("moe_init",) if v.upcycle == "blocks" else ()))  # matched to its params
        nodes.append(Node(folder, "upcycle", "upcycle" if folder == "moe_init" else "baselines",
                          needs, partial(_upcycle, variant=variant),
                          f"dense base → {v.upcycle} MoE for {variant}", model=folder))
    for variant in variants:
        v = VARIANTS[variant]
        group = "cpt_moe" if variant == "cpt_moe" else \
            "graft" if variant == cfg.graft.method else "baselines"
        if v.train is not None:
            assert v.trained is not None
            needs = ("data", *base_node)
            if v.upcycled is not None:
                needs = ("data", str(v.upcycled))
            if v.tokens == "flops_matched":
                needs = (*needs, "moe_init")  # its budget is the MoE's active-FLOPs ratio
            nodes.append(Node(v.trained, "train", "cpt_moe" if variant == "cpt_moe" else group,
                              needs, partial(_train, variant=variant),
                              f"continued pre-training for {variant} ({v.train})",
                              model=v.trained))
        if v.graft is not None:
            target = graft_target(v)
            nodes.append(Node(variant, "graft", group, (target, *base_node, *post_node),
                              partial(_graft, variant=variant),
                              f"{v.graft} graft onto {target}", model=variant))
    evaluated = evaluated_variants(cfg, ["base", "post", *variants])
    produced = {n.model: n.name for n in nodes if n.model}
    for variant in evaluated:
        # every evaluation reads the routing analysis' held-out text, which the data stage
        # (or the world) holds: without it, the part's fingerprint would depend on timing
        needs = ("data", *((produced[variant],) if variant in produced else ()))
        nodes.append(Node(f"eval_{variant}", "evaluate", "evaluate", needs,
                          partial(_evaluate_one, variant=variant, model_dir=None),
                          f"{variant} on the evaluation suites"))
    eval_nodes = tuple(f"eval_{v}" for v in evaluated)
    nodes.append(Node("evaluate", "report", "evaluate", eval_nodes,
                      partial(_assemble, variants=tuple(evaluated)),
                      "tables, plots and routing analysis of every evaluated variant"))
    nodes.append(Node("report", "report", "report", ("evaluate",), _report,
                      "the HTML report from MLflow"))
    return nodes


def evaluation_nodes(variants: dict[str, Path]) -> list[Node]:
    """The evaluation part of the DAG alone, for models already built (``deltamoe evaluate``):
    one node per variant, then the assembly."""
    nodes = [Node(f"eval_{name}", "evaluate", "evaluate", (),
                  partial(_evaluate_one, variant=name, model_dir=str(path)),
                  f"{name} on the evaluation suites") for name, path in variants.items()]
    nodes.append(Node("evaluate", "report", "evaluate", tuple(n.name for n in nodes),
                      partial(_assemble, variants=tuple(variants)),
                      "tables, plots and routing analysis of every evaluated variant"))
    return nodes


def evaluated_variants(cfg: RunConfig, candidates: Iterable[str]) -> list[str]:
    """``candidates`` in registry order (unknown names after), kept by ``evaluation.variants``."""
    order = list(VARIANTS)
    unique = list(dict.fromkeys(candidates))
    ranked = sorted(unique, key=lambda n: (order.index(n) if n in order else len(order), n))
    wanted = cfg.evaluation.variants
    return [n for n in ranked if wanted is None or n in wanted]


def select(nodes: list[Node], from_stage: str | None = None,
           only: Iterable[str] = ()) -> set[str]:
    """Names of the nodes to run: all, those of ``only`` (nodes or groups), or every node from
    ``from_stage`` (a node or group) on in workflow order. Nodes not selected are taken as they
    are on disk; a selected node whose input is missing fails naming it."""
    names = [n.name for n in nodes]
    known = set(names) | set(GROUPS)
    wanted = [s.replace("-", "_") for s in (*only, *([from_stage] if from_stage else []))]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages: {', '.join(GROUPS)} (or a "
                         f"single node: {', '.join(names)})")
    only = [s.replace("-", "_") for s in only]
    if only:
        return {n.name for n in nodes if n.name in only or n.group in only}
    if from_stage is None:
        return set(names)
    start = from_stage.replace("-", "_")
    if start in GROUPS:
        later = set(GROUPS[GROUPS.index(start):])
        return {n.name for n in nodes if n.group in later}
    chosen = {start}
    for node in nodes:  # topological order: a node's needs come before it
        if chosen & set(node.needs):
            chosen.add(node.name)
    return chosen
