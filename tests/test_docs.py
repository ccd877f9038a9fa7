"""The documentation: the guides' code runs, and every public name has an API entry.

Every fenced block whose info string is exactly ``python`` in
``docs/index.md`` and ``docs/guides/*.md`` is executed: a page's blocks run top to bottom in one
fresh interpreter (so they share variables, like a reader following along),
with ``JAX_PLATFORMS=cpu`` and the repository root as the working directory.
Blocks meant only to be read use another info string (``text``, ``console``,
or MyST's ``{code-block} python``). A page's ``assert`` lines are its claims.

The built HTML itself is checked by ``make docs`` (``docs/check_html.py``);
here the API pages are generated without Sphinx's build and checked to hold
an entry for every public name, so a name added to an ``__all__`` is
caught by ``make test`` too.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = sorted(  # pages written at build time (``_*.md``, included by the guides) are not guides
    p for p in glob.glob(os.path.join(ROOT, "docs", "guides", "*.md"))
    if not os.path.basename(p).startswith("_")
)
PAGES = [os.path.join(ROOT, "docs", "index.md")] + GUIDES
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


def code_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced ``python`` block of a Markdown page."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group("fence"), m.group("info").strip(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # closing fence
        if info == "python":
            blocks.append((start + 1, "\n".join(body)))
    return blocks


def page_script(path: str) -> str:
    """The page's python blocks as one script, each line at its line number in the page."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out: list[str] = []
    for first, code in code_blocks(text):
        out += [""] * (first - 1 - len(out))  # pad so tracebacks give the page's line numbers
        out += code.splitlines()
    return "\n".join(out) + "\n"


def test_code_blocks_parser():
    page = "intro\n```python\na = 1\n```\n```text\nnot run\n```\n````python\nb = 2\n````\n"
    assert code_blocks(page) == [(3, "a = 1"), (9, "b = 2")]


def test_every_guide_has_code():
    assert len(GUIDES) >= 4, GUIDES
    for path in GUIDES:
        with open(path, encoding="utf-8") as f:
            assert code_blocks(f.read()), f"{path} has no python block to test"


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_guide_code_runs(path, tmp_path):
    script = tmp_path / (os.path.basename(path)[:-3] + "_md.py")
    script.write_text(page_script(path), encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert proc.returncode == 0, (
        f"{os.path.relpath(path, ROOT)} (line numbers are the page's):\n{proc.stderr[-4000:]}"
    )


def test_api_pages_cover_every_public_name(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))
    try:
        import qo_api
    finally:
        sys.path.pop(0)
    written = qo_api.write_pages(str(tmp_path))
    parts = []
    for p in written:
        with open(p, encoding="utf-8") as f:
            parts.append(f.read())
    text = "\n".join(parts)
    missing = []
    for module, names in qo_api.all_public().items():
        for name in names:
            if module == qo_api.PACKAGE:
                if f"``quotient_opt.{name}``" not in text:
                    missing.append(f"quotient_opt.{name}")
            elif not re.search(rf"^\.\. (auto\w+|py:data):: ({re.escape(module)}\.)?{name}$",
                               text, re.MULTILINE):
                missing.append(f"{module}.{name}")
    assert not missing, f"public names without an API entry: {missing}"
    # names the issue relies on are among them
    public = qo_api.all_public()
    for name in ["infer_symmetry", "train_population", "quotient_adam", "revive_dead_units"]:
        assert name in public["quotient_opt"]
    for name in ["neb", "hessian_spectrum", "trajectory_pca"]:
        assert name in public["quotient_opt.landscape"]


def test_html_check_names_what_is_missing(tmp_path):
    """``docs/check_html.py`` (run by ``make docs``) fails on a missing name, and only then."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import check_html
    finally:
        sys.path.pop(0)
    public = check_html.qo_api.all_public()
    top = [f"<span>quotient_opt.{n}</span>" for n in public["quotient_opt"]]
    anchors = [f'<dt id="{m}.{n}">' for m, names in public.items() if m != "quotient_opt"
               for n in names]
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "index.html").write_text("\n".join(top), encoding="utf-8")
    (tmp_path / "api" / "all.html").write_text("\n".join(anchors), encoding="utf-8")
    assert check_html.missing_names(str(tmp_path)) == []
    (tmp_path / "api" / "all.html").write_text(
        "\n".join(a for a in anchors if "quotient_opt.landscape.neb\"" not in a), encoding="utf-8"
    )
    assert check_html.missing_names(str(tmp_path)) == [
        "quotient_opt.landscape.neb (no anchor in the built pages)"
    ]
    assert check_html.main(["check_html", str(tmp_path)]) == 1
