"""The ``plan`` command: what a run will cost (parameters, memory per GPU, FLOPs, GPU-hours),
printed before anything starts, from the models' ``config.json`` shapes alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from components.config import ConfigError, RunConfig, load_config
from workflows.cli.app import UserError, cli

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes"
_UNSET = re.compile(r"^environment variable (\w+) is not set")


def _load_for_plan(file: Path) -> tuple[RunConfig, list[str]]:
    """The config, with credentials and storage variables that are unset here filled by
    placeholders: a plan reads shapes and budgets, never storage, tracking or the hub."""
    try:
        return load_config(file), []
    except ConfigError as err:
        unset = [m.group(1) for _, message in err.issues if (m := _UNSET.match(message))]
        if not unset or len(unset) != len(err.issues):
            raise
    env = {**os.environ, **{var: f"<{var} unset>" for var in unset}}
    return load_config(file, env=env), sorted(set(unset))


@cli.command("plan")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="GPUs the training shards over [default: resources.num_workers × "
              "gpus_per_worker].")
@click.option("--mfu", type=click.FloatRange(min=0.01, max=1.0), default=0.40,
              show_default=True, help="Model-FLOPs utilisation the GPU-hours assume.")
@click.option("--peak-tflops", type=click.FloatRange(min=1.0), default=989.0,
              show_default=True, help="Peak dense bf16 TFLOP/s of one GPU (H100 SXM: 989).")
@click.option("--shapes", type=click.Path(exists=True, path_type=Path), default=None,
              help="The base model's config.json (or its folder) [default: a local base "
              "model, else workflows/configs/shapes/<org>--<name>.json].")
def plan_command(file: Path, gpus: int | None, mfu: float, peak_tflops: float,
                 shapes: Path | None) -> None:
    """Print what FILE's continued pre-training will cost before it runs: parameters (dense,
    MoE total and active), memory per GPU under FSDP2, tokens, FLOPs and GPU-hours."""
    from components.cost import CostError, format_plan, plan_run

    cfg, unset = _load_for_plan(file)
    try:
        plan = plan_run(cfg, gpus=gpus, mfu=mfu, peak_tflops=peak_tflops,
                        shapes=str(shapes) if shapes else None,
                        search=[file.resolve().parent / "shapes", SHAPES])
    except CostError as err:
        raise UserError(str(err)) from None
    click.echo(f"plan of {file} (run '{cfg.run_name}')")
    if unset:
        click.echo(f"not set here, not needed for a plan: {', '.join(unset)}")
    click.echo(format_plan(plan), nl=False)
