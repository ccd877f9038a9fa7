"""A Python script run in a subprocess with 4 host CPU devices, alongside the test session.

``jax`` fixes its device count at start-up, so sharding tests run their
script in a child process (started by a module fixture at the module's first
test, so it works while the other tests run) and read back the one line it
prints as ``RESULT<json>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

Started = tuple[subprocess.Popen, Any]


def start(script: str, *args: str) -> Started:
    """Runs ``python -c script <tests dir> *args`` on 4 host devices, x64 as in the session."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1"  # as in the test session (conftest)
    here = os.path.dirname(os.path.abspath(__file__))
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: no blocking on a full buffer
    proc = subprocess.Popen(
        [sys.executable, "-c", script, here, *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, log


def stop(started: Started | None) -> None:
    """Kills the child if it still runs and closes its log."""
    if started is None:
        return
    proc, log = started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def result(started: Started | None, timeout: float = 900) -> Any:
    """Waits for the child and returns its last ``RESULT`` line, decoded."""
    assert started is not None
    proc, log = started
    proc.wait(timeout=timeout)
    log.seek(0)
    out = log.read()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT") :])
