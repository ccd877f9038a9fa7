"""Lazy attributes: names of a subpackage that need an optional framework.

flax and equinox are optional (``pip install quotient_opt[flax]``,
``[equinox]``): ``import quotient_opt`` imports neither. A subpackage whose
public names need one (the example nnx models, the nnx layers) defines them in
a private module imported on first access through :func:`lazy_getattr`.

:func:`moved_getattr` keeps the old spellings of names that moved to another
subpackage (``quotient_opt.place_kinks`` now lives in
:mod:`quotient_opt.contrib`): the same objects, imported on first access.
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
    return moved_getattr(package, f"{package}.{module}", names)


def moved_getattr(package: str, target: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports the module ``target``
    (a full dotted name) when one of ``names`` is first read and returns that name from it."""
    names = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(require(target, f"{package}.{name}"), name)

    return __getattr__
