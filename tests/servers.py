"""Local servers started by tests (an MLflow server, a Ray head): wait until they answer on
loopback, and stop their whole process group afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str,
              timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start: {log.read_text()}")
        time.sleep(1)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (``start_new_session=True``), SIGKILL it after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
