"""Lazy attributes: names of a subpackage that need an optional framework.

flax and equinox are optional (``pip install quotient_opt[flax]``,
``[equinox]``): ``import quotient_opt`` imports neither. A subpackage whose
public names need one (the example nnx models, the nnx layers) defines them in
a private module imported on first access through :func:`lazy_getattr`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

#: the extra that installs each optional top-level module
EXTRAS = {"flax": "flax", "equinox": "equinox"}


def require(module: str, what: str) -> Any:
    """Imports ``module``; if its framework is not installed, an ``ImportError`` saying
    that ``what`` needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        raise ImportError(f"{what} needs {top}, which is not installed: "
                          f"pip install 'quotient_opt[{EXTRAS[top]}]'") from e


def lazy_getattr(package: str, module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``package.module``
    when one of ``names`` is first read and returns that name from it."""
    names = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(require(f"{package}.{module}", f"{package}.{name}"), name)

    return __getattr__
