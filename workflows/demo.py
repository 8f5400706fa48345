"""The main job on the embedded default: the synthetic world, a local MLflow store, under runs/.

It grows with the project: today it validates the demo config, opens the run's MLflow parent
run, builds (or skips) the synthetic world stage with its tokenizer and tiny base model, and
upcycles that model into the run's language-allocated MoE (``models/moe-init``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from components.config import ConfigError, RunConfig, load_config
from components.storage import RunDir, fingerprint
from components.tracking import ExpansionTracker, resolve_tracking_uri
from workflows.upcycle_stage import ensure_upcycled
from workflows.world import ensure_world

PENDING_STAGES = ("data", "train", "graft", "evaluate", "report")


@dataclass
class DemoResult:
    run_dir: str
    tracking_uri: str
    parent_run_id: str
    stages: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"run directory: {self.run_dir}"]
        lines += [f"  {name:<8} {state}" for name, state in self.stages.items()]
        lines.append(f"  not built yet: {', '.join(PENDING_STAGES)}")
        lines.append(f"MLflow run {self.parent_run_id} in {self.tracking_uri}")
        if self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"browse: mlflow ui --backend-store-uri {self.tracking_uri} "
                         "--host 127.0.0.1 --workers 1")
        return "\n".join(lines)


def run_demo(config_path: str | Path) -> DemoResult:
    """Run every stage that exists so far on the config's synthetic world."""
    cfg: RunConfig = load_config(config_path)
    if cfg.world is None:
        raise ConfigError([("world", "the demo needs a synthetic `world` section")],
                          str(config_path))
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri, run_dir)
    tracker = ExpansionTracker(tracking_uri, cfg.tracking.experiment, cfg.run_name,
                               tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    result = DemoResult(run_dir=run_dir.uri, tracking_uri=tracking_uri,
                        parent_run_id=tracker.parent_run_id)
    try:
        stage = run_dir.stage("world")
        with tracker.stage("world") as logger:
            manifest, built = ensure_world(stage, cfg.world)
            summary = manifest.extra.get("summary", {})
            logger.log_params({"world": cfg.world.model_dump(mode="json")})
            metrics = {"world/files": len(manifest.outputs), "world/bytes": manifest.total_bytes,
                       "world/model_parameters": summary.get("model_parameters", 0),
                       "world/vocab_size": summary.get("vocab_size", 0)}
            metrics.update({f"world/documents/{tag}": n
                            for tag, n in summary.get("documents", {}).items()})
            logger.log_metrics(metrics, step=0)
            logger.log_dict(summary, "world_summary.json")
            if built:
                logger.log_external_model("world-base-init", f"{stage.uri}/model", manifest,
                                          model_type="hf-causal-lm")
        result.stages["world"] = "built" if built else "skipped (manifest matches)"
        with tracker.stage("upcycle") as logger:
            _, built = ensure_upcycled(cfg, run_dir, logger)
        result.stages["upcycle"] = "built" if built else "skipped (manifest matches)"
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    return result
