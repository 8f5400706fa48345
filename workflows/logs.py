"""How much a run prints: the project's own progress at INFO, third-party chatter at WARNING.

A normal run's log is the project's lines (one per stage, the summary) and real warnings; lm-eval's
"Building contexts", generation kwargs, transformers' and MLflow's notices only with ``-v``.
The same levels apply in the driver (:func:`setup_logging`, from the CLI) and in every Ray task
(:func:`quiet_third_party`, from the node's body): ``-v`` reaches the tasks through
``DELTAMOE_VERBOSE``, which local Ray workers inherit. A terminal gets rich's coloured lines; a
file or a pipe gets plain lines, never wrapped or padded to 80 columns.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["OWN", "VERBOSE_ENV", "quiet_third_party", "setup_logging"]

OWN = ("components", "workflows", "dashboards", "benchmarks", "__main__")
"""The project's loggers: INFO by default, DEBUG with ``-v``."""
VERBOSE_ENV = "DELTAMOE_VERBOSE"
_CHATTY = ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "mlflow", "alembic",
           "urllib3", "filelock", "httpx", "fsspec", "torch", "matplotlib", "PIL", "evaluate",
           "ray")
"""Libraries that configure their own loggers (lm-eval and transformers set a level and a
handler of their own), so the root level alone does not quiet them."""


def quiet_third_party(verbose: bool | None = None) -> None:
    """Third-party loggers at WARNING (INFO when verbose), the project's at INFO (DEBUG); safe
    to call in every task, repeatedly."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    # libraries that set their own level when first imported read it from these
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("LMEVAL_LOG_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "warning")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "0" if verbose else "1")
    third = logging.INFO if verbose else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(third)
    for name in OWN:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


class _Once(logging.Filter):
    """Drops a third-party record already shown (lm-eval repeats one warning per task)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN:
            return True
        key = (record.name, record.levelno, str(record.msg))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def setup_logging(verbose: bool) -> None:
    """The driver's logging: one handler on the root logger, the levels above."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s",
                                               datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(_Once())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        handlers=[handler], force=True)
    quiet_third_party(verbose)
