"""Training on the sphere of each scale-invariant block (AdamH-style).

A block :math:`W_b` feeding a normalization is scale-invariant
(:class:`~quotient_opt.symmetry.NormScale`), so its norm is a free choice of
representative that only sets the block's effective learning rate
(:math:`\\propto 1/\\|W_b\\|^2`). Holding it fixed makes that rate constant: after
the inner step each block is retracted to its norm at ``init``,

.. math::

   W_b \\leftarrow r_b\\, \\frac{W_b + u_b}{\\lVert W_b + u_b \\rVert},

the section of the scale-invariance orbit at radius :math:`r_b` (the function is
unchanged by the retraction, to the normalization's :math:`\\epsilon`). With a
horizontal inner step (``optax.chain(optax.adam(lr), qo.project_horizontal(sym))``)
the retraction only removes the second-order growth
:math:`\\lVert W_b + u_b\\rVert^2 = \\lVert W_b\\rVert^2 + \\lVert u_b\\rVert^2`. This
is the AdamH recipe (an Adam step, then each hidden matrix's norm restored),
on the exact invariant blocks.

References:
  Heo et al. *AdamP*, ICLR 2021 (the growth of scale-invariant weights under
  momentum). https://arxiv.org/abs/2006.08217

  Salimans, Kingma. *Weight Normalization*, 2016. https://arxiv.org/abs/1602.07868
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quotient_opt import _validate as validate
from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry._norm_scale import NAME as NORM_SCALE
from quotient_opt.symmetry._paths import map_with_path
from quotient_opt.symmetry._spec import Symmetry
from quotient_opt.transforms._common import on_subtree
from quotient_opt.transforms._order import JUMP, mark

PyTree = Any



class KeepNormsState(NamedTuple):
    """State of :func:`keep_norms`.

    Attributes:
      radii: per scale-invariant factor, the norm of each block at ``init``.
    """

    radii: tuple[jax.Array, ...]


def keep_norms(sym: Symmetry) -> optax.GradientTransformationExtraArgs:
    """Keeps every scale-invariant block of the parameters at its norm at ``init``.

    Chain it last: ``optax.chain(optax.adam(lr), qo.project_horizontal(sym),
    qo.keep_norms(sym))`` (AdamH-style). Its update is the step plus the
    retraction of each block to its sphere, a jump of the parameters along the
    invariance orbit, so nothing that rescales updates may follow it
    (:func:`~quotient_opt.check_chain` warns). Leaves outside every
    :class:`~quotient_opt.symmetry.NormScale` block pass unchanged. A block of
    zero norm is left alone.

    Args:
      sym: the model's :class:`~quotient_opt.Symmetry`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`KeepNormsState`;
      ``update`` needs ``params``.
    """
    validate.symmetry(sym)

    def factors(params: PyTree) -> tuple[Any, ...]:
        sub = on_subtree(sym, params, "qo.keep_norms")
        return tuple(f for f in sub.factors if f.kind == NORM_SCALE)

    def init_fn(params: PyTree) -> KeepNormsState:
        if not jax.tree.leaves(params):
            return KeepNormsState(())
        return KeepNormsState(tuple(jnp.sqrt(s) for s in _kinds.gram_diagonal(sym, params, factors=factors(params))))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        validate.params_given(params, "qo.keep_norms")
        facs = factors(params)
        if not facs:
            return updates, state
        new = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        logs = []
        for r, sq in zip(state.radii, _kinds.gram_diagonal(sym, new, factors=facs)):
            ok = (sq > 0) & (r > 0)
            logs.append(jnp.where(ok, jnp.log(jnp.where(ok, r, 1.0))
                                  - 0.5 * jnp.log(jnp.where(ok, sq, 1.0)), 0.0))
        moved = _kinds.act(sym, new, tuple(logs), factors=facs)
        out = map_with_path(lambda path, u, m, p: (m - p).astype(u.dtype), updates, moved,
                            params)
        return out, state

    return mark(optax.GradientTransformationExtraArgs(init_fn, update_fn), "qo.keep_norms", JUMP)
