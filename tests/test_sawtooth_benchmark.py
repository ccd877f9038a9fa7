"""Smoke test of ``python -m benchmarks.sawtooth --quick``: it runs, writes the JSON with the
documented keys and the figures, counts evaluations equally, and its numbers are sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ["sawtooth_average_fit.png", "sawtooth_best_fit.png", "sawtooth_loss_hist.png",
           "sawtooth_curves.png", "sawtooth_basin.png", "sawtooth_wide.png"]


@pytest.mark.slow
def test_quick_run_writes_json_and_figures(tmp_path):
    out, js = tmp_path / "png", tmp_path / "saw.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sawtooth", "--quick", "--json", str(js),
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(js.read_text())
    assert {"methods", "throughput", "basin", "wide", "task", "config"} <= set(d)
    assert d["task"]["exact_fit"] == "final MSE <= 1e-10"
    budget = d["config"]["steps"]
    for name in ("sgd_momentum", "adadelta", "adam", "kink_adam_lm"):
        m = d["methods"][name]
        for key in ("nets", "steps", "grad_evals", "median_final_mse", "best_final_mse",
                    "exact_fit_rate", "wall_s"):
            assert key in m, (name, key)
        assert budget - 3 <= m["grad_evals"] <= budget  # equal budgets (LM steps count 3)
        assert 0 < m["best_final_mse"] <= m["median_final_mse"] < 0.1
        assert 0.0 <= m["exact_fit_rate"] <= 1.0 and m["wall_s"] > 0
    lm = d["methods"]["kink_adam_lm"]["phases"]
    assert [p["label"] for p in lm] == ["adam", "Levenberg-Marquardt"] and lm[1]["steps"] == 60
    assert d["throughput"]["per_method_net_evals_per_s"]["adam"] > 0
    # the basin: LM from the exact weights plus small noise fits exactly, Adam does not
    basin = d["basin"]["methods"]
    small = [b for b in basin["lm"]["bins"] if b["r_hi"] < 0.02]
    assert small and sum(b["exact_rate"] * b["n"] for b in small) / sum(b["n"] for b in small) > 0.5
    assert all(b["exact_rate"] == 0.0 for b in basin["adam"]["bins"])
    assert set(d["wide"]["widths"]) == {"8"}
    for f in FIGURES:
        assert (out / f).stat().st_size > 10_000, f
    assert sorted(d["files"]) == sorted(FIGURES)
