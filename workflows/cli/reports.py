"""The ``report`` command: the HTML report of a run, built from MLflow."""

from __future__ import annotations

from pathlib import Path

import click

from components.config import load_config
from workflows.cli.app import UserError, cli


@cli.command("report")
@click.argument("run_name")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Run config (storage root, tracking URI, languages); RUN_NAME "
              "replaces its run_name, so one config reports every run of a sweep.")
@click.option("--root", default="runs", show_default=True,
              help="Storage root holding RUN_NAME/, without --config.")
def report_command(run_name: str, config_file: Path | None, root: str) -> None:
    """Build the HTML report of RUN_NAME from MLflow into runs/RUN_NAME/report/index.html and
    log it as an artifact of the run's `report` child run."""
    from components.storage import RunDir
    from components.tracking import resolve_tracking_uri
    from dashboards.report import ReportError, report_child_logger, report_run

    if config_file is not None:
        cfg = load_config(config_file, overrides={"run_name": run_name})
        root, options, experiment = (cfg.storage.root, cfg.storage.storage_options,
                                     cfg.tracking.experiment)
        configured, languages = cfg.tracking.uri, (cfg.languages.original, cfg.languages.new)
    else:
        options, experiment, configured, languages = {}, None, None, (None, None)
        if "://" not in root and not (Path(root) / run_name).is_dir():
            raise UserError(f"{Path(root) / run_name}: no such run directory (pass --root or "
                            "--config)")
    run_dir = RunDir(root, run_name, options)
    uri = resolve_tracking_uri(configured, run_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI or tracking.uri)")
    try:
        logger = report_child_logger(uri, run_name, experiment)
        path = report_run(run_name, run_dir, uri, experiment=experiment, original=languages[0],
                          new=languages[1], logger=logger)
    except ReportError as err:
        raise UserError(str(err)) from None
    click.echo(f"report: {path}")
