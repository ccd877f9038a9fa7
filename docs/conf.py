"""Sphinx configuration for the quotient_opt documentation (``make docs``)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import quotient_opt

project = "quotient_opt"
author = "The quotient_opt developers"
copyright = "2025, The quotient_opt developers"
release = version = quotient_opt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "qo_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "guides/_*"]
templates_path: list[str] = []

# --- docstrings: Google style (napoleon), reST markup inside (``literals``, :func:, .. math::)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = True
autodoc_typehints = "signature"
autodoc_typehints_description_target = "documented"

autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
add_module_names = False
python_use_unqualified_type_names = True

# --- Markdown guides (MyST): $math$, $$display$$, ::: fences
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --- HTML: furo bundles its assets (no network at build time); MathJax loads from
# its CDN when a page is viewed.
html_theme = "furo"
html_title = f"quotient_opt {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
