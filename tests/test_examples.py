"""Smoke test: the examples run and lower the loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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


def _run(module: str, *args: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_digits_cnn_reaches_95_percent_from_both_starts():
    out = _run("examples.digits_cnn", "--steps", "150")  # the example runs 400
    acc = re.search(r"quotient_adam.*from θ\s+([0-9.]+)%, from g·θ\s+([0-9.]+)%; final max "
                    r"\|logit difference\| ([0-9.e+-]+)", out)
    assert acc, out
    assert float(acc.group(1)) >= 95.0 and float(acc.group(2)) >= 95.0, out
    assert re.search(r"adam\(3e-3\)\s+test accuracy", out) and "sgd(0.1" in out, out


@pytest.mark.slow
def test_own_model_guide_runs():
    out = _run("examples.own_model")
    assert "embed+down1+down2: 16 units, relu; permutable, rescalable" in out, out
    assert "passes sym.check" in out
    before, after = map(float, re.search(r"before ([0-9.e+-]+)\s+after ([0-9.e+-]+)", out).groups())
    assert after < 0.1 * before, out
