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

Started = tuple[subprocess.Popen, Any, tuple[str, ...]]

#: What XLA prints when it gives up on a collective that one of the 4 device
#: threads never joined. Seen once in a full run on a loaded 2-core machine
#: (the same child passed when run again); the child is then run once more.
_STUCK_COLLECTIVE = "Expected 4 threads to join the rendezvous"


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
    return proc, log, (script, *args)


def stop(started: Started | None) -> None:
    """Kills the child if it still runs and closes its log."""
    if started is None:
        return
    proc, log, _ = started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _read(started: Started, timeout: float) -> tuple[int, str]:
    proc, log, _ = started
    proc.wait(timeout=timeout)
    log.seek(0)
    return proc.returncode, log.read()


def result(started: Started | None, timeout: float = 900) -> Any:
    """Waits for the child and returns its last ``RESULT`` line, decoded.

    A child that XLA aborted on a stuck collective (``_STUCK_COLLECTIVE``) is
    run once more; any other failure, or a second abort, fails.
    """
    assert started is not None
    code, out = _read(started, timeout)
    if code != 0 and _STUCK_COLLECTIVE in out:
        again = start(*started[2])
        try:
            code, out = _read(again, timeout)
        finally:
            stop(again)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
    assert code == 0 and lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT") :])
