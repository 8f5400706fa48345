"""The synthetic-world stage: build (or skip) the demo world inside an atomic stage folder."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from components.config import WorldConfig
from components.storage import Manifest, StageBuild, StageDir, fingerprint
from components.synthetic import GENERATOR_VERSION, build_world
from components.tracking import RankZeroLogger


def world_fingerprint(world: WorldConfig) -> str:
    """Same settings and generator version → same bytes, so the stage can be skipped."""
    return fingerprint("world", GENERATOR_VERSION, world.model_dump(mode="json"))


def ensure_world(stage: StageDir, world: WorldConfig,
                 refuse_foreign: bool = False) -> tuple[Manifest, bool]:
    """Build the world into ``stage`` unless a matching one is there; returns (manifest, built)."""
    def build(work: StageBuild) -> None:
        summary = build_world(work.path, **world.generator_args())
        work.extra["summary"] = _plain(summary)

    return stage.ensure(world_fingerprint(world), build, config=world.model_dump(mode="json"),
                        refuse_foreign=refuse_foreign)


def log_world(logger: RankZeroLogger, stage: StageDir, world: WorldConfig, manifest: Manifest,
              built: bool) -> None:
    """The world's size as metrics, its settings as params, the random model as a lineage root."""
    summary = manifest.extra.get("summary", {})
    logger.log_params({"world": world.model_dump(mode="json")})
    metrics = {"world/files": len(manifest.outputs), "world/bytes": manifest.total_bytes,
               "world/model_parameters": summary.get("model_parameters", 0),
               "world/vocab_size": summary.get("vocab_size", 0)}
    metrics.update({f"world/documents/{tag}": n
                    for tag, n in summary.get("documents", {}).items()})
    metrics.update({f"world/base_tokens/{tag}": n
                    for tag, n in summary.get("base_tokens", {}).items()})
    metrics.update({f"world/coverage/{tag}": v
                    for tag, v in summary.get("coverage", {}).items()})
    logger.log_metrics(metrics, step=0)
    logger.log_dict(summary, "world_summary.json")
    if built:
        logger.log_external_model("world-base-init", f"{stage.uri}/model", manifest,
                                  model_type="hf-causal-lm")


def _plain(obj: Any) -> Any:
    """A summary dataclass as JSON-ready data (paths become strings)."""
    if is_dataclass(obj):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    return str(obj)
