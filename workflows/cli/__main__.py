"""``python -m workflows.cli``."""

from workflows.cli import main

main()
