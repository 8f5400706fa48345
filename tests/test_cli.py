"""The command line: help everywhere, clear errors with exit 2, pending stages say so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from workflows.cli import DEMO_CONFIG, cli

SUBCOMMANDS = ["run", "data", "upcycle", "train", "graft", "evaluate", "report", "submit",
               "status", "logs", "stop", "schedule", "sweep", "reproduce",
               "demo", "config"]


def _deltamoe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_every_subcommand_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in top.output
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
    assert set(SUBCOMMANDS) <= set(cli.commands)


def test_config_show_prints_resolved_config() -> None:
    proc = _deltamoe("config", "show", str(DEMO_CONFIG))
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["run_name"] == "demo"
    assert shown["upcycle"]["router_init"] == "xavier_normal"
    assert shown["models"] is None and shown["world"]["seed"] == 0


def test_config_validate_ok_and_errors(tmp_path: Path) -> None:
    ok = _deltamoe("config", "validate", str(DEMO_CONFIG))
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_CONFIG.read_text().replace("  top_k: 2", "  top_k: 2\n  topk: 3"))
    proc = _deltamoe("config", "validate", str(bad))
    assert proc.returncode == 2
    assert "upcycle.topk: unknown key; did you mean 'top_k'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = _deltamoe("config", "validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr
