"""Linear assignment: exact on the host (scipy) and a jittable auction.

Both solve :math:`\\max_\\pi \\sum_u S_{u, \\pi(u)}` over permutations
:math:`\\pi` of an ``(n, n)`` similarity matrix (any leading batch axes) and
return ``perm`` with ``perm[u] = π(u)``, the column matched to row ``u``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _scipy_batched(s: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    s = np.asarray(s)
    n = s.shape[-1]
    flat = s.reshape(-1, n, n)
    out = np.empty(flat.shape[:2], np.int32)
    for i, m in enumerate(flat):
        if np.all(np.isfinite(m)):
            out[i] = linear_sum_assignment(m, maximize=True)[1]
        else:  # never propagate a bad matrix into a wrong permutation
            out[i] = np.arange(n)
    return out.reshape(s.shape[:-1])


def exact_assignment(s: jax.Array) -> jax.Array:
    """Optimal assignment by ``scipy.optimize.linear_sum_assignment``, callable under jit.

    Runs on the host through ``jax.pure_callback`` (under ``vmap`` the whole
    batch goes to one callback). A matrix with a non-finite entry gives the
    identity.
    """
    shape = jax.ShapeDtypeStruct(s.shape[:-1], jnp.int32)
    return jax.pure_callback(_scipy_batched, shape, s, vmap_method="broadcast_all")


def auction_assignment(
    s: jax.Array,
    *,
    eps: float | None = None,
    factor: float = 5.0,
    max_rounds: int | None = None,
) -> jax.Array:
    """Assignment by Bertsekas' auction with ε-scaling, in pure JAX (jit-, vmap-safe).

    Rows are bidders and columns objects. The similarities are first mapped
    to :math:`[0, 1]` (:math:`C = (S - \\min S) / (\\max S - \\min S)`). In a
    round every unassigned bidder :math:`u` bids for its best object
    :math:`j_1 = \\arg\\max_j C_{uj} - p_j` the price
    :math:`p_{j_1} + (v_1 - v_2) + \\varepsilon`, where :math:`v_1, v_2`
    are its best and second-best net values; each object goes to its highest
    bidder, whose bid becomes its price, and its previous owner is unassigned
    (Jacobi auction: all bidders bid at once, one ``(n, n)`` pass per round).
    The final assignment is :math:`\\varepsilon`-optimal: its total is within
    :math:`n \\varepsilon` (in units of the range of ``S``) of the optimum, so
    it is optimal when ``n ε`` is below the gap to the second-best
    assignment. ε-scaling runs phases with ε decreasing by ``factor`` from
    ``1/4`` to ``eps``, each warm-started with the previous prices.

    Args:
      s: similarities ``(..., n, n)``.
      eps: final ε relative to the range of ``s`` (default
        :math:`\\sqrt{\\text{machine eps}} / n`: 1.5e-8 / n in float64,
        3.5e-4 / n in float32).
      factor: ε reduction per phase.
      max_rounds: cap on bidding rounds per phase (default ``50 n + 200``);
        bidders still unassigned then get the free objects in order, so the
        result is always a permutation.

    Returns:
      ``perm`` of shape ``s.shape[:-1]`` (int32).

    References:
      Bertsekas. *The auction algorithm: A distributed relaxation method for
      the assignment problem*, Annals of Operations Research 14, 1988.
    """
    s = jnp.asarray(s)
    if s.shape[-1] != s.shape[-2]:
        raise ValueError(f"auction_assignment: square matrices needed, got shape {s.shape}")
    if s.ndim > 2:
        fn = lambda m: auction_assignment(m, eps=eps, factor=factor, max_rounds=max_rounds)
        return jax.vmap(fn)(s.reshape(-1, *s.shape[-2:])).reshape(s.shape[:-1])
    n = s.shape[-1]
    if n == 1:
        return jnp.zeros((1,), jnp.int32)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.float32)
    dt = s.dtype
    fin = jnp.finfo(dt)
    eps_final = float(np.sqrt(fin.eps) / n) if eps is None else float(eps)
    phases = max(1, int(np.ceil(np.log(0.25 / eps_final) / np.log(factor))) + 1)
    rounds = 50 * n + 200 if max_rounds is None else int(max_rounds)
    lo, hi = jnp.min(s), jnp.max(s)
    ok = jnp.all(jnp.isfinite(s))
    c = jnp.where(ok, (s - lo) / jnp.maximum(hi - lo, fin.tiny), 0.0)
    idx = jnp.arange(n, dtype=jnp.int32)
    none = jnp.full((n,), -1, jnp.int32)

    def bid_round(carry):
        price, owner, assign, e, it = carry
        val = c - price[None, :]
        j1 = jnp.argmax(val, axis=1).astype(jnp.int32)
        v1 = jnp.max(val, axis=1)
        v2 = jnp.max(jnp.where(idx[None, :] == j1[:, None], -jnp.inf, val), axis=1)
        bid = price[j1] + (v1 - v2) + e
        active = assign < 0
        bids = jnp.where(active[:, None] & (idx[None, :] == j1[:, None]), bid[:, None], -jnp.inf)
        best = jnp.max(bids, axis=0)
        winner = jnp.argmax(bids, axis=0).astype(jnp.int32)
        got = best > -jnp.inf
        lost = (assign >= 0) & got[jnp.maximum(assign, 0)]
        assign = jnp.where(lost, -1, assign)
        assign = assign.at[jnp.where(got, winner, n)].set(idx, mode="drop")
        owner = jnp.where(got, winner, owner)
        price = jnp.where(got, best, price)
        return price, owner, assign, e, it + 1

    def phase(k, carry):
        price, _, _ = carry
        e = jnp.maximum(0.25 / factor**k, eps_final).astype(dt)
        init = (price, none, none, e, jnp.zeros((), jnp.int32))
        price, owner, assign, _, _ = jax.lax.while_loop(
            lambda cr: jnp.any(cr[2] < 0) & (cr[4] < rounds), bid_round, init
        )
        return price, owner, assign

    price0 = jnp.zeros((n,), dt)
    _, owner, assign = jax.lax.fori_loop(0, phases, phase, (price0, none, none))
    # complete a capped phase: unassigned bidders take the free objects in order
    free_bidder = assign < 0
    free_object = owner < 0
    rank_b = jnp.cumsum(free_bidder) - 1
    obj_of_rank = jnp.zeros((n,), jnp.int32).at[
        jnp.where(free_object, jnp.cumsum(free_object) - 1, n)
    ].set(idx, mode="drop")
    assign = jnp.where(free_bidder, obj_of_rank[jnp.maximum(rank_b, 0)], assign)
    return jnp.where(ok, assign, idx)
