"""The ``deltamoe`` command line: one group, its commands split by concern.

Importing this package registers every command on :data:`cli`; :func:`main` is the console
entry point.
"""

from __future__ import annotations

import os
import sys

import click

from components.config import ConfigError
from workflows.cli import cluster, cost, models, reports, runs  # noqa: F401  (register commands)
from workflows.cli.app import DEMO_CONFIG, REPRODUCE_CONFIG, UserError, cli

__all__ = ["DEMO_CONFIG", "REPRODUCE_CONFIG", "UserError", "cli", "main"]


def main() -> None:
    """Console entry point: user errors become one message and exit status 2."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except ConfigError as err:
        click.echo(f"config error:\n{err}", err=True)
        sys.exit(2)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # the machine, not the input: a full disk, a lost mount
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            sys.exit(130)
        raise
