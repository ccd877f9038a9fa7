"""Smoke test: the examples run and lower the loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["examples.nnx_optimizer", "examples.equinox_loop"])
def test_example_runs_and_trains(module):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = re.findall(r"before ([0-9.e+-]+)\s+after ([0-9.e+-]+)", proc.stdout)
    assert len(pairs) == 2, proc.stdout
    for before, after in pairs:
        assert float(after) < 0.5 * float(before), proc.stdout
