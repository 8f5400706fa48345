"""Local servers started by tests (an MLflow server, a Ray head): wait until they answer on
loopback, and stop their whole process group afterwards."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    """``n`` consecutive loopback ports that are free now, between Ray's default worker ports
    (10002–19999) and the kernel's ephemeral range (32768+).

    Ports taken from the ephemeral range (bind to port 0) are handed out again to whatever
    connects next — a Ray head once found its runtime-env agent's port inside the worker range
    it was given; a block below that range is only taken by someone who asks for it."""
    rng = random.Random()  # not the tests' seeded stream: parallel runs must not pick alike
    for _ in range(200):
        start = rng.randrange(20000, 32768 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(start, start + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports in 20000-32767")


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


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group (``start_new_session=True``), SIGKILL it after ``grace``
    seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group already ended (a server that failed to start)
        proc.wait(timeout=30)
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
