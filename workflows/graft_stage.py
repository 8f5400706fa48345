"""The graft stage of a run: Δpost onto the CPT-trained model, and the merge baselines.

Inputs come from the run directory and the config: the dense base (``models.base`` or the world's
model), the post-trained sibling (``models.post``, or ``models/post`` that the demo trains on the
world), and the target the method's variant grafts onto (:func:`components.variants.graft_target`:
``models/cpt_moe`` for DeltaMoE, ``models/cpt_dense`` for the dense baselines). Each writes
``models/<variant>`` atomically, skipped when its manifest matches.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from components.config import RunConfig
from components.delta.graft import GraftInputs, GraftOptions, GraftResult, graft, parse_size
from components.delta.methods import get_method
from components.delta.verify import verify
from components.storage import Manifest, RunDir, StageBuild, StageDir, fingerprint
from components.tracking import RankZeroLogger
from components.variants import get_variant, graft_target
from workflows.upcycle_stage import base_model_dir


def _stage_model(run_dir: RunDir, stage: str, produced_by: str) -> Path:
    local = run_dir.local_path
    path = (local / stage) if local is not None else None
    if path is None or not (path / "config.json").exists() or \
            run_dir.stage(stage).read_manifest() is None:
        raise FileNotFoundError(f"{run_dir.uri}/{stage}: not built yet (it comes from "
                                f"{produced_by})")
    return path


def default_target(method: str) -> str:
    """The stage whose model ``method`` grafts onto, from the method's own variant."""
    get_method(method)  # an unknown method is named as such
    return f"models/{graft_target(get_variant(method))}"


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
    manifest, result = build_grafted(stage, fp, inputs, options, verify_output=cfg.graft.verify)
    if result is not None and logger is not None:
        logger.log_params({"graft": {"method": result.method, "formula": result.formula}})
        logger.log_metrics({"graft/tensors": result.tensors, "graft/bytes": result.bytes,
                            "graft/units": result.units}, step=0)
        logger.log_external_model(name or result.method, stage.uri, manifest,
                                  model_type="hf-causal-lm")
    return manifest, result is not None


def build_grafted(stage: StageDir, stage_fingerprint: str, inputs: GraftInputs,
                  options: GraftOptions, *, verify_output: bool = False,
                  refuse_foreign: bool = False) -> tuple[Manifest, GraftResult | None]:
    """Graft into ``stage`` unless its manifest matches: the one skip-or-build path of the
    run's graft stages and of ``deltamoe graft --base ... --out ...``. Returns (manifest, the
    graft's result or None when skipped); ``verify_output`` checks a sample of the output
    against an independent computation before the stage commits."""
    done: list[GraftResult] = []

    def build(work: StageBuild) -> None:
        done.append(graft(inputs, work.path, options))
        if verify_output:
            work.extra["verified"] = verify(inputs, work.path, options)
        work.extra["graft"] = asdict(done[0])

    manifest, _ = stage.ensure(stage_fingerprint, build, inputs=asdict(inputs),
                               config=asdict(options), refuse_foreign=refuse_foreign)
    return manifest, done[0] if done else None
