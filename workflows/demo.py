"""The main job on the embedded default: the whole expansion on the synthetic world.

The demo config (``workflows/configs/demo.yaml``) has a ``world`` section and no ``models``, so
the workflow first makes its own model pair (a tiny base pre-trained on the world's original
languages, and its sibling fine-tuned on their instruction data, both cached in the run
directory), then adds the new languages with every stage of ``deltamoe run``, on a local Ray
instance and a local MLflow store under ``runs/``.
"""

from __future__ import annotations

from pathlib import Path

from components.config import ConfigError, RunConfig, load_config
from workflows.expand import WorkflowResult, run_workflow


def run_demo(config_path: str | Path, *, from_stage: str | None = None,
             only: tuple[str, ...] = ()) -> WorkflowResult:
    """Run (or resume) the demo's expansion; the result's summary ends with the comparison
    table and the command that opens the MLflow UI."""
    cfg: RunConfig = load_config(config_path)
    if cfg.world is None:
        raise ConfigError([("world", "the demo needs a synthetic `world` section")],
                          str(config_path))
    return run_workflow(cfg, from_stage=from_stage, only=only)
