"""The ``deltamoe`` command group and what its commands share.

Errors a user can fix (a bad config, a missing path) are printed as one clear message with exit
status 2, never as a traceback. The commands live by concern in the sibling modules: stage
commands (:mod:`.runs`, :mod:`.models`), cluster commands (:mod:`.cluster`), reports
(:mod:`.reports`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from components.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
REPRODUCE_CONFIG = CONFIGS / "reproduce.yaml"


class RegistryChoice(click.Choice):
    """A click choice read from a registry (``"module:NAME"``) when first needed, so the CLI
    lists exactly the registry's names without importing torch to print ``--help``."""

    def __init__(self, where: str) -> None:
        self._where = where
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        module, _, name = self._where.partition(":")
        found = getattr(importlib.import_module(module), name)
        return tuple(found() if callable(found) else found)


def config_choices(section: type, field: str) -> click.Choice:
    """The values a config field's ``Literal`` allows, as a click choice: the flag and the
    config key accept the same names, written once in the schema."""
    import typing

    return click.Choice(typing.get_args(section.model_fields[field].annotation))


class UserError(click.ClickException):
    """Something the user can fix; exit status 2 like every other input error."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and third-party libraries' INFO lines (lm-eval, transformers, "
              "MLflow, Ray).")
@click.version_option(package_name="deltamoe")
def cli(verbose: bool) -> None:
    """DeltaMoE: add languages to an instruct LLM without alignment data.

    Upcycle the dense base into a language-allocated MoE, continue pre-training on the new
    languages, then graft the post-training delta (θ_instruct − θ_base) onto it.
    """
    from workflows.logs import setup_logging

    setup_logging(verbose)


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


def run_stage(config: Path, overrides: tuple[str, ...] | dict[str, Any], node: str,
              folder: str) -> tuple[Any, Any, bool]:
    """Load CONFIG and run the single DAG node ``node`` as the workflow would (a Ray task where
    its resources are, tracked in its MLflow child run): the stage commands never build in this
    process. Returns (run_dir, the manifest of ``folder``, built); failures exit like ``run``."""
    from components.storage import RunDir
    from workflows.expand import run_workflow

    parsed = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    cfg = load_config(config, overrides=parsed)
    with workflow_errors():
        result = run_workflow(cfg, only=(node,))
    run_dir = RunDir(cfg.storage.root, cfg.run_name, cfg.storage.storage_options)
    manifest = run_dir.stage(folder).read_manifest()
    assert manifest is not None  # the node succeeded, so its stage committed
    return run_dir, manifest, result.outcomes[node].state == "built"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors of the stages that mean bad input rather than a bug: one message, exit 2."""
    from workflows.expand import user_error_types

    return user_error_types()


@contextmanager
def workflow_errors() -> Iterator[None]:
    """A workflow whose stages failed: every stage's state, each failure in one line, then exit
    2 when all were bad input, else 1. Bad input raised before any stage ran is exit 2 too."""
    from workflows.expand import WorkflowError

    try:
        yield
    except WorkflowError as err:
        click.echo(err.result.summary())
        click.echo(f"error: {err}", err=True)
        sys.exit(2 if err.user_error else 1)
    except user_errors() as err:
        raise UserError(str(err)) from None
