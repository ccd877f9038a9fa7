"""Checks that the built HTML documents every public name of quotient_opt.

``python docs/check_html.py docs/_build/html``: for every name in the
``__all__`` of ``quotient_opt`` and of each documented subpackage (or, where a
subpackage has none, the public names it defines), the built pages must
contain its anchor (``id="quotient_opt.<sub>.<name>"``), and the top-level API
page must list ``quotient_opt.<name>``. Exits non-zero, naming what is missing.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qo_api


def missing_names(html_dir: str) -> list[str]:
    pages = {}
    for path in glob.glob(os.path.join(html_dir, "**", "*.html"), recursive=True):
        with open(path, encoding="utf-8") as f:
            pages[os.path.relpath(path, html_dir)] = f.read()
    if not pages:
        return [f"no HTML pages under {html_dir}"]
    everything = "\n".join(pages.values())
    top = pages.get(os.path.join("api", "index.html"), "")
    missing = []
    where = qo_api.documented_at()  # a name public in two subpackages: its first one's anchor
    for module, names in qo_api.all_public().items():
        for name in names:
            if module != qo_api.PACKAGE:
                obj = getattr(importlib.import_module(module), name)
                module, name = where.get(id(obj), f"{module}.{name}").rsplit(".", 1)
            if module == qo_api.PACKAGE:
                if f"quotient_opt.{name}</span>" not in top:
                    missing.append(f"quotient_opt.{name} (not listed on api/index.html)")
            elif f'id="{module}.{name}"' not in everything:
                missing.append(f"{module}.{name} (no anchor in the built pages)")
    return missing


def main(argv: list[str]) -> int:
    html_dir = argv[1] if len(argv) > 1 else os.path.join("docs", "_build", "html")
    missing = missing_names(html_dir)
    if missing:
        print("public names missing from the documentation:", *missing, sep="\n  ")
        return 1
    total = sum(len(v) for v in qo_api.all_public().values())
    print(f"docs: all {total} public names of quotient_opt and its subpackages are documented")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
