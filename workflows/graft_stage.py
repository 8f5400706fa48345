"""The graft stage of a run: Δpost onto the CPT-trained model, and the merge baselines.

Inputs come from the run directory and the config: the dense base (``models.base`` or the world's
model), the post-trained sibling (``models.post``, or ``models/post`` that the demo trains on the
world), and the target the method needs — ``models/cpt-moe`` for DeltaMoE, ``models/cpt-dense``
for the dense baselines. Each method writes ``models/<method>`` atomically, skipped when its
manifest matches.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from components.config import RunConfig
from components.delta.graft import GraftInputs, GraftOptions, GraftResult, graft, parse_size, verify
from components.delta.methods import get_method
from components.storage import Manifest, RunDir, fingerprint
from components.tracking import RankZeroLogger
from workflows.upcycle_stage import base_model_dir

TARGET_STAGE = {"target_moe": "models/cpt-moe", "target_dense": "models/cpt-dense"}


def _stage_model(run_dir: RunDir, stage: str, produced_by: str) -> Path:
    local = run_dir.local_path
    path = (local / stage) if local is not None else None
    if path is None or not (path / "config.json").exists() or \
            run_dir.stage(stage).read_manifest() is None:
        raise FileNotFoundError(f"{run_dir.uri}/{stage}: not built yet (it comes from "
                                f"{produced_by})")
    return path


def default_target(method: str) -> str:
    """The stage whose model ``method`` grafts onto: the CPT-MoE, or the CPT-dense model."""
    return TARGET_STAGE["target_moe" if get_method(method).moe_target else "target_dense"]


def graft_inputs(cfg: RunConfig, run_dir: RunDir, method: str,
                 target_stage: str | None = None) -> GraftInputs:
    """Base, post and target directories for ``method`` in this run (``target_stage`` overrides
    the method's usual target, e.g. the FLOPs-matched dense model)."""
    base = base_model_dir(cfg, run_dir)
    if cfg.models is not None and Path(cfg.models.post).expanduser().is_dir():
        post = Path(cfg.models.post).expanduser()
    else:
        post = _stage_model(run_dir, "models/post", "post-training the base: deltamoe train")
    stage = target_stage or default_target(method)
    target = _stage_model(run_dir, stage, "continued pre-training: deltamoe train")
    return GraftInputs(str(base), str(post), str(target))


def graft_options(cfg: RunConfig, method: str | None = None, workers: int | None = None
                  ) -> GraftOptions:
    g = cfg.graft
    return GraftOptions(method=method or g.method, scale=g.scale,
                        expert_scales=dict(g.expert_scales), family_scales=dict(g.family_scales),
                        density=g.density, seed=g.seed, dtype=g.dtype,
                        max_shard_bytes=parse_size(g.max_shard_size),
                        workers=workers if workers is not None else cfg.resources.num_workers)


def ensure_grafted(cfg: RunConfig, run_dir: RunDir, method: str | None = None,
                   logger: RankZeroLogger | None = None, *, target_stage: str | None = None,
                   name: str | None = None) -> tuple[Manifest, bool]:
    """Build (or skip) ``models/<name or method>``; returns (manifest, built)."""
    options = graft_options(cfg, method)
    inputs = graft_inputs(cfg, run_dir, options.method, target_stage)
    stage = run_dir.stage(f"models/{name or options.method}")
    # Only the model this method grafts onto: a stage built later (the CPT-dense model of the
    # baselines) must not change the fingerprint, or a rerun would rebuild this graft.
    target_fp = run_dir.stage(target_stage or default_target(options.method)).read_manifest()
    fp = fingerprint("graft", asdict(inputs), {**asdict(options), "workers": None},
                     [target_fp.fingerprint if target_fp else None])
    if stage.is_complete(fp):
        manifest = stage.read_manifest()
        assert manifest is not None
        return manifest, False
    with stage.build(fp, inputs=asdict(inputs), config=asdict(options)) as work:
        result: GraftResult = graft(inputs, work.path, options)
        if cfg.graft.verify:
            work.extra["verified"] = verify(inputs, work.path, options)
        work.extra["graft"] = asdict(result)
    manifest = stage.read_manifest()
    assert manifest is not None
    if logger is not None:
        logger.log_params({"graft": {"method": result.method, "formula": result.formula}})
        logger.log_metrics({"graft/tensors": result.tensors, "graft/bytes": result.bytes,
                            "graft/units": result.units}, step=0)
        logger.log_external_model(name or result.method, stage.uri, manifest,
                                  model_type="hf-causal-lm")
    return manifest, True
