"""The ``deltamoe`` command group and what its commands share.

Errors a user can fix (a bad config, a missing path) are printed as one clear message with exit
status 2, never as a traceback. The commands live by concern in the sibling modules: stage
commands (:mod:`.runs`, :mod:`.models`), cluster commands (:mod:`.cluster`), reports
(:mod:`.reports`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from components.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
REPRODUCE_CONFIG = CONFIGS / "reproduce.yaml"


class UserError(click.ClickException):
    """Something the user can fix; exit status 2 like every other input error."""

    exit_code = 2


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "urllib3", "filelock",
                  "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="deltamoe")
def cli(verbose: bool) -> None:
    """DeltaMoE: add languages to an instruct LLM without alignment data.

    Upcycle the dense base into a language-allocated MoE, continue pre-training on the new
    languages, then graft the post-training delta (θ_instruct − θ_base) onto it.
    """
    _setup_logging(verbose)


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    """``--set train.steps=10`` pairs; values are read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE with a dotted key")
        out[key] = yaml.safe_load(value)
    return out


def int_list(option: str, text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers, got {text!r}") from None


def tracked(config: Path, overrides: tuple[str, ...], stage: str, errors: tuple[type, ...],
             build: Any) -> tuple[Any, Any, bool]:
    """Load CONFIG, open the run's MLflow parent, run ``build(cfg, run_dir, logger)`` in the
    stage's child run; ``errors`` become one message and exit 2. Returns (run_dir, manifest,
    built)."""
    from components.storage import RunDir, fingerprint
    from components.tracking import ExpansionTracker, resolve_tracking_uri

    cfg = load_config(config, overrides=parse_overrides(overrides))
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    tracker = ExpansionTracker(resolve_tracking_uri(cfg.tracking.uri, run_dir),
                               cfg.tracking.experiment, cfg.run_name, tags=cfg.tracking.tags)
    resolved = cfg.model_dump(mode="json")
    tracker.log_config(resolved, fingerprint(resolved))
    try:
        with tracker.stage(stage) as logger:
            manifest, built = build(cfg, run_dir, logger)
    except errors as err:
        tracker.finish(failed=True)
        raise UserError(str(err)) from None
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    return run_dir, manifest, built


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors of the stages that mean bad input rather than a bug: one message, exit 2."""
    from components.delta.graft import GraftError
    from components.moe.families import UnsupportedArchitectureError
    from components.moe.upcycle import UpcycleError

    return (UpcycleError, UnsupportedArchitectureError, GraftError)
