"""Release packaging: the wheel and sdist build offline and pass ``twine check``.

The build runs without isolation (``python -m build --no-isolation``), from a
copy of the files an sdist needs, so it uses the environment's setuptools and
fetches nothing. The wheel is then installed (``--no-deps``) into a fresh
directory and imported from there.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import quotient_opt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("build", reason="the dev extra installs build")
pytest.importorskip("twine", reason="the dev extra installs twine")


def _run(*cmd: str, cwd: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"]:
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "quotient_opt"), src / "quotient_opt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ".", cwd=str(src))
    wheels = glob.glob(str(out / "*.whl"))
    sdists = glob.glob(str(out / "*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return wheels[0], sdists[0]


def test_twine_check_strict(dists):
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *dists, cwd=ROOT)
    assert out.count("PASSED") == 2, out


def test_version_is_single_sourced(dists):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project and "version" in project["dynamic"]
    wheel, sdist = dists
    version = quotient_opt.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", version), version
    assert os.path.basename(wheel).startswith(f"quotient_opt-{version}-")
    assert os.path.basename(sdist) == f"quotient_opt-{version}.tar.gz"


def test_wheel_contents_and_metadata(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "quotient_opt/py.typed" in names
    for sub in ["symmetry", "transforms", "training", "landscape", "models"]:
        assert f"quotient_opt/{sub}/__init__.py" in names, sub
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/", "docs/")) for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert "Requires-Python: >=3.11" in meta
    assert "Description-Content-Type: text/markdown" in meta
    for label in ["Homepage", "Documentation", "Repository", "Issues", "Changelog"]:
        assert f"Project-URL: {label}, https://" in meta, label
    for dep in ["jax", "optax"]:
        assert re.search(rf"^Requires-Dist: {dep}>=[^;]*$", meta, re.MULTILINE), dep
    for dep in ["flax", "equinox"]:  # optional: an extra of its own, and in dev
        assert re.search(rf"^Provides-Extra: {dep}$", meta, re.MULTILINE), dep
        for extra in [dep, "dev"]:
            assert re.search(rf'^Requires-Dist: {dep}>=.*; extra == "{extra}"$', meta,
                             re.MULTILINE), (dep, extra)
        assert not re.search(rf"^Requires-Dist: {dep}\b[^;]*$", meta, re.MULTILINE), dep


def test_sdist_contents(dists):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for name in ["pyproject.toml", "README.md", "LICENSE", "quotient_opt/py.typed",
                 "quotient_opt/__init__.py"]:
        assert name in names, name


def test_installed_wheel_imports(dists, tmp_path):
    wheel, _ = dists
    target = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), wheel, cwd=str(tmp_path))
    code = ("import quotient_opt as qo, os; "
            "print(qo.__version__, os.path.dirname(qo.__file__), "
            "os.path.exists(os.path.join(os.path.dirname(qo.__file__), 'py.typed')))")
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    out = _run(sys.executable, "-c", code, cwd=str(tmp_path), env=env).split()
    assert out[0] == quotient_opt.__version__
    assert out[1].startswith(str(target)) and out[2] == "True", out
