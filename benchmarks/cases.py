"""The registry of the library's public transformations, built the way they are meant to run.

One :class:`Case` per public transformation, in the chain order it is
meant for (``project_horizontal`` after Adam, the path norm before it, the
wrappers around Adam or SGD), with small-model defaults. The test suite
(``tests/test_common.py``, ``tests/test_optax_battery.py``) runs every case
and the benchmarks build their methods from it with their own options
(``CASES_BY_NAME['rebalance'].build(sym, lr=1e-3, every=1)``), so a new
transformation is added in one place and every check and benchmark sees it.

It lives here rather than under ``tests/`` because the benchmarks import it
(they run as ``python -m benchmarks.NAME``; ``tests/`` is not a package).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

import quotient_opt as qo

#: Learning rate of the Adam-based cases (tiny models, a few hundred steps).
LR = 0.01


class Case(NamedTuple):
    """How one public transformation is built.

    Attributes:
      name: the transformation's public name.
      factory: ``factory(sym, residual_fn, **options) -> optimizer``; ``options``
        override the small-model defaults (``lr``, ``every``, ...).
      needs_value_fn: pass the loss as the ``value_fn`` extra arg (revival's
        starved-piece test reads it).
      uses_sym: the transformation works on the symmetry (``False`` for
        ``levenberg_marquardt``, which needs ``residual_fn`` instead).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    needs_value_fn: bool = False
    uses_sym: bool = True

    def build(self, sym: qo.Symmetry | None, residual_fn: Callable | None = None,
              **options: Any) -> optax.GradientTransformation:
        """The optimizer for ``sym`` (and ``residual_fn``, for Levenberg-Marquardt)."""
        if not self.uses_sym and residual_fn is None:
            raise ValueError(f"{self.name}: pass residual_fn (params -> residuals)")
        return self.factory(sym, residual_fn, **options)


def _project_horizontal(sym, _, *, lr=LR, **kw):
    return optax.chain(optax.adam(lr), qo.project_horizontal(sym, **kw))


def _path_norm(sym, _, *, lr=LR, **kw):
    return optax.chain(qo.scale_by_path_norm(sym, **kw), optax.adam(lr))


def _path_sgd(sym, _, *, lr=0.02, momentum=0.9, **kw):
    return qo.path_sgd(lr, sym, momentum=momentum, **kw)


def _rebalance(sym, _, *, lr=LR, every=3, **kw):
    return qo.rebalance(optax.adam(lr), sym, every=every, **kw)


def _teleport(sym, _, *, lr=LR, every=3, steps=2, **kw):
    return qo.teleport(optax.adam(lr), sym, every=every, steps=steps, **kw)


def _revive(sym, _, *, lr=LR, **kw):
    return qo.revive_dead_units(optax.adam(lr), sym, **kw)


def _quotient_sgd(sym, _, *, lr=0.05, momentum=0.9, **kw):
    return qo.quotient_sgd(lr, sym, momentum=momentum, **kw)


def _quotient_adam(sym, _, *, lr=LR, **kw):
    return qo.quotient_adam(lr, sym, **kw)


def _levenberg_marquardt(_, residual_fn, **kw):
    return qo.contrib.levenberg_marquardt(residual_fn, **kw)


CASES: tuple[Case, ...] = (
    Case("project_horizontal", _project_horizontal),
    Case("scale_by_path_norm", _path_norm),
    Case("path_sgd", _path_sgd),
    Case("rebalance", _rebalance),
    Case("teleport", _teleport),
    Case("revive_dead_units", _revive, needs_value_fn=True),
    Case("quotient_sgd", _quotient_sgd),
    Case("quotient_adam", _quotient_adam),
    Case("levenberg_marquardt", _levenberg_marquardt, uses_sym=False),
)
CASES_BY_NAME = {c.name: c for c in CASES}
