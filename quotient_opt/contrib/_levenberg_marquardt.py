"""Levenberg-Marquardt: damped Gauss-Newton steps for least-squares losses.

For a loss that is a sum (or mean) of squared residuals
:math:`L(\\theta) = c\\,\\lVert r(\\theta)\\rVert^2`, each step linearizes the
residuals, :math:`r(\\theta + \\delta) \\approx r + J\\delta` with
:math:`J = \\partial r / \\partial\\theta`, and solves the damped normal equations

.. math::

   (J^\\top J + \\lambda D)\\,\\delta = -J^\\top r,

where :math:`D` is Marquardt's scaling :math:`\\mathrm{diag}(J^\\top J)`
(floored, so parameters the residuals do not see, such as a dead unit's, get
no step) or the identity (Levenberg). When there are fewer residuals than
parameters the same step is computed in data space,
:math:`\\delta = -D^{-1}J^\\top (J D^{-1} J^\\top + \\lambda I)^{-1} r` (the
push-through identity), so the linear solve is :math:`\\min(N, P)`-sized.

The step is tried at once (one extra evaluation of ``residual_fn``) and kept
only if it lowers :math:`\\lVert r\\rVert^2`; the damping :math:`\\lambda`
follows Nielsen's rule from the gain ratio :math:`\\rho` (actual over
predicted decrease): on success :math:`\\lambda \\leftarrow \\lambda
\\max(1/3,\\,1 - (2\\rho - 1)^3)`, :math:`\\nu \\leftarrow 2`; on failure
:math:`\\lambda \\leftarrow \\nu\\lambda`, :math:`\\nu \\leftarrow 2\\nu`, and
the update is zero. Near a zero-residual minimum the steps are Gauss-Newton
steps and converge quadratically, which is what turns "in the basin" into an
exact fit: first-order methods (Adam, SGD) stall several orders of magnitude
above it on ill-conditioned problems such as the sawtooth network.

The linear algebra runs in at least float32 (bfloat16 and float16 params
are solved in float32 and the step cast back), the state's scalars too. The
update keeps the params' sharding (``Explicit`` meshes: the solve runs on
replicated copies and the step is resharded; ``Auto``: its leaves are
sharded alike the params).

The update is branchless (``jnp.where``), so it runs under ``jax.jit``,
``jax.vmap`` (a population of networks: :func:`~quotient_opt.train_population`)
and ``lax.scan``. Each update evaluates the residuals and their Jacobian
once (per-example gradients when the residuals are given per example with
``data``; else ``jax.jacfwd`` or ``jax.jacrev``, whichever has fewer passes)
and the residuals once more at the trial point, and solves one
``min(N, P)``-sized linear system (LU: on a CPU, batched small Cholesky
factorizations are far slower under ``vmap``): meant for small problems (a few
thousand parameters or residuals at most).

References:
  Levenberg. *A Method for the Solution of Certain Non-Linear Problems in Least
  Squares*, 1944. Marquardt. *An Algorithm for Least-Squares Estimation of
  Nonlinear Parameters*, 1963.

  Madsen, Nielsen, Tingleff. *Methods for Non-Linear Least Squares Problems*,
  2004 (the damping rule, §3.2).
  https://www2.imm.dtu.dk/pubdb/edoc/imm3215.pdf
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike
from jax.flatten_util import ravel_pytree

from quotient_opt import _validate as validate
from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import path_str
from quotient_opt.symmetry._spec import masked_paths, solve_dtype

PyTree = Any


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`.

    Attributes:
      count: number of updates so far (int32).
      damping: the damping :math:`\\lambda` for the next step.
      nu: Nielsen's growth factor :math:`\\nu` (2 after a success, doubled after
        each failure).
      value: :math:`\\lVert r\\rVert^2 / N` (the mean squared residual) at the
        params the last update returned (after its step, if accepted); ``inf``
        before the first update (``init`` does not call ``residual_fn``, so it
        works on ``jax.ShapeDtypeStruct`` params and under ``optax.tree.map_params``).
      accepted: whether the last step was accepted.
    """

    count: jax.Array
    damping: jax.Array
    nu: jax.Array
    value: jax.Array
    accepted: jax.Array


def levenberg_marquardt(
    residual_fn: Callable[[PyTree], jax.Array],
    *,
    damping: jax.typing.ArrayLike = 1e-3,
    scaling: Literal["marquardt", "identity"] = "marquardt",
    min_damping: float = 1e-15,
    max_damping: float = 1e15,
    diag_floor: float = 1e-9,
    jacobian: Literal["auto", "fwd", "rev"] = "auto",
    data: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt steps on ``mean(residual_fn(params)**2)`` (module docstring).

    The incoming ``updates`` (gradients) are ignored: the step comes from the
    Jacobian of ``residual_fn`` at ``params``. The returned update is the full
    step (no learning rate), or zeros when the trial point did not lower the
    loss. Compose it after a first-order optimizer, e.g. a few dozen steps to
    polish the end of an Adam run to machine precision.

    Example::

      def residual_fn(p):
          return (apply(p, task.x) - task.y).ravel()

      tx = qo.contrib.levenberg_marquardt(residual_fn)
      params, state, losses = qo.fit(tx, params, lambda p: jnp.mean(residual_fn(p) ** 2), 60)

    Args:
      residual_fn: ``params -> r``, the residuals (any shape; flattened), or
        with ``data``, ``(params, example) -> r_i``. The loss it describes is
        ``mean(r**2)`` (any positive multiple of ``sum(r**2)`` has the same
        steps).
      damping: initial damping :math:`\\lambda_0`.
      scaling: ``'marquardt'`` (:math:`D = \\mathrm{diag}(J^\\top J)`, invariant to
        rescaling each parameter) or ``'identity'`` (Levenberg).
      min_damping: lower clip of :math:`\\lambda`.
      max_damping: upper clip of :math:`\\lambda`.
      diag_floor: with Marquardt scaling, the diagonal is floored at
        ``diag_floor * max(diag)`` (and at the dtype's tiny), so columns of
        :math:`J` that are zero (dead units) get a finite, tiny step.
      jacobian: ``'fwd'`` (``jax.jacfwd``, one pass per parameter), ``'rev'``
        (``jax.jacrev``, one pass per residual) or ``'auto'`` (the fewer);
        without ``data`` only.
      data: a batch of examples (a pytree of arrays with a leading example
        axis). Then ``residual_fn(params, example)`` gives the residual(s) of
        *one* example and the Jacobian's rows are per-example gradients
        (``vmap`` over the examples of ``jax.jacrev``), which costs about one
        gradient evaluation instead of one pass per parameter: often 50-100x
        faster for small networks.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
      and ignores extra args.

    Raises:
      ValueError: for a non-callable ``residual_fn`` or invalid options.

    References:
      Marquardt 1963; Madsen, Nielsen, Tingleff 2004 (module docstring).
    """
    validate.function("residual_fn", residual_fn, "params -> residuals")
    validate.one_of("scaling", scaling, ("marquardt", "identity"))
    validate.one_of("jacobian", jacobian, ("auto", "fwd", "rev"))
    if not 0 < min_damping <= max_damping:
        raise ValueError(
            f"need 0 < min_damping <= max_damping, got {min_damping} and {max_damping}"
        )
    validate.number("diag_floor", diag_floor)
    validate.number("damping", damping, strict=True)

    per_example = data is not None
    if per_example:
        sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(data)}
        if not sizes or None in sizes or len(sizes) != 1:
            raise ValueError(
                "data must be a pytree of arrays sharing a leading example axis, got leading "
                f"sizes {sorted(map(str, sizes))}"
            )

    def whole(params: PyTree) -> None:
        holes = masked_paths(params, none=False)  # (None: an equinox model's static fields)
        if holes:
            raise ValueError(
                "levenberg_marquardt: residual_fn takes the whole params, but it was given a "
                f"subtree masking out '{path_str(holes[0])}' (optax.masked / "
                "optax.multi_transform); apply it to the whole params tree"
            )

    def flat_residuals(params: PyTree) -> jax.Array:
        if per_example:
            r = jax.vmap(residual_fn, in_axes=(None, 0))(params, data)
        else:
            r = residual_fn(params)
        return jnp.ravel(views.replicated(r))  # (Explicit sharding: flattened replicated)

    def residuals_and_jacobian(params: PyTree, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """``r (N,)`` and ``J (N, P)`` (columns in ``ravel_pytree`` order)."""
        if per_example:

            def one(example: Any) -> tuple[jax.Array, PyTree]:
                def f(p: PyTree) -> jax.Array:
                    return jnp.ravel(residual_fn(p, example))

                return f(params), jax.jacrev(f)(params)

            r, jac = jax.vmap(one)(data)  # (n, k), leaves (n, k, *leaf.shape)
            n_res = r.size
            cols = [leaf.reshape(n_res, -1) for leaf in jax.tree.leaves(jac)]
            return r.reshape(-1).astype(dtype), jnp.concatenate(cols, axis=1).astype(dtype)
        flat, unravel = ravel_pytree(params)

        def res(v: jax.Array) -> jax.Array:
            return jnp.ravel(views.replicated(residual_fn(unravel(v)))).astype(dtype)

        r = res(flat)
        mode = jacobian if jacobian != "auto" else ("fwd" if flat.shape[0] <= r.shape[0] else "rev")
        return r, (jax.jacfwd if mode == "fwd" else jax.jacrev)(res)(flat)

    def init_fn(params: PyTree) -> LevenbergMarquardtState:
        whole(params)
        dtype = solve_dtype(params)
        return LevenbergMarquardtState(
            count=jnp.zeros([], jnp.int32),
            damping=jnp.asarray(damping, dtype),
            nu=jnp.asarray(2.0, dtype),
            value=jnp.asarray(jnp.inf, dtype),
            accepted=jnp.asarray(True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del updates, extra_args
        validate.params_given(params, "levenberg_marquardt")
        whole(params)
        given = params
        params = jax.tree.map(views.replicated, params)  # Explicit sharding: solve replicated
        flat, unravel = ravel_pytree(params)
        dtype = solve_dtype(params)  # bfloat16 / float16: solved in float32
        r, J = residuals_and_jacobian(params, dtype)
        n_res, n_par = J.shape
        g = J.T @ r
        tiny = jnp.finfo(dtype).tiny
        if scaling == "marquardt":
            col = jnp.sum(J * J, axis=0)
            d = jnp.maximum(col, jnp.maximum(diag_floor * jnp.max(col), tiny))
        else:
            d = jnp.ones((n_par,), dtype)
        lam = state.damping.astype(dtype)
        if n_res < n_par:  # data space: delta = -D^-1 J^T (J D^-1 J^T + lam I)^-1 r
            Jd = J / d
            K = Jd @ J.T + lam * jnp.eye(n_res, dtype=dtype)
            a = jnp.linalg.solve(K, r)
            delta = -(Jd.T @ a)
        else:  # parameter space: (J^T J + lam D) delta = -J^T r
            A = J.T @ J + jnp.diag(lam * d)
            delta = -jnp.linalg.solve(A, g)
        r_new = flat_residuals(unravel((flat + delta).astype(flat.dtype))).astype(dtype)
        f0 = jnp.sum(r * r)
        f1 = jnp.sum(r_new * r_new)
        lin = r + J @ delta
        predicted = f0 - jnp.sum(lin * lin)
        actual = f0 - f1
        ok = jnp.isfinite(f1) & jnp.all(jnp.isfinite(delta)) & (actual > 0) & (predicted > 0)
        rho = jnp.where(ok, actual / jnp.where(predicted > 0, predicted, 1.0), 0.0)
        shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        lam_new = jnp.where(ok, lam * shrink, lam * state.nu.astype(dtype))
        lam_new = jnp.clip(lam_new, min_damping, max_damping)
        nu_new = jnp.where(ok, 2.0, 2.0 * state.nu.astype(dtype))
        step = jnp.where(ok, delta, jnp.zeros_like(delta))
        value = jnp.where(ok, f1, f0) / n_res
        new_state = LevenbergMarquardtState(
            count=optax.safe_increment(state.count),
            damping=lam_new.astype(state.damping.dtype),
            nu=jnp.minimum(nu_new, 2.0**60).astype(state.nu.dtype),
            value=value.astype(state.value.dtype),
            accepted=ok,
        )
        out = jax.tree.map(_like, unravel(step.astype(flat.dtype)), given)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _like(step: jax.Array, param: Any) -> jax.Array:
    """``step`` in ``param``'s dtype and sharding: resharded on an ``Explicit`` mesh, else
    sharded alike (the flat solve loses the layout an ``Auto`` mesh gave the params)."""
    step = views.sharded_like(step.astype(jnp.result_type(param)), param)
    if views.explicit_sharding(param) is None and isinstance(param, jax.Array):
        step = shard_alike(step, param)[0]
    return step
