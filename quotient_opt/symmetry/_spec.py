"""The symmetry spec of a network and its group action on parameters.

A network computes the same function at :math:`\\theta` and at
:math:`g \\cdot \\theta` whenever :math:`g` permutes the hidden units of a
layer (moving all their parameters together) or, behind a positively
homogeneous activation :math:`\\sigma(cx) = c\\,\\sigma(x)` for :math:`c > 0`,
multiplies the parameters producing a unit by :math:`c` and those reading it
by :math:`1/c`. For a max over the pieces of a window, the pieces share one
scale (``max`` is jointly homogeneous) and may be permuted among themselves.

The spec is data. A :class:`Symmetry` is a tuple of :class:`UnitGroup`; a
group lists, as :class:`AxisRef`, every axis of every leaf that holds its
units, with the *scale law* of that leaf (``power``: the entries of unit
``u`` are multiplied by :math:`c_u^{\\text{power}}`):

* ``power=+1``: entries that produce the unit (kernel columns, the bias);
* ``power=-1``: entries that read it (the next kernel's rows);
* ``power=0``: entries that are only permuted (a per-unit gain such as a
  normalization's scale);

and ``level``: whether the axis indexes the group's units (``windows ×
pieces``, before a max over pieces) or its windows (after it). Everything
else, :meth:`Symmetry.act`, the orbit tangents, the Gram system, the canonical
form, the path norm, teleportation, revival and state transport, is derived
from this one description through the per-unit views (reshapes, slices
and one small gather per ref), written once.

Specs come from :func:`~quotient_opt.infer_symmetry`, which traces the
model, or are written by hand (:func:`symmetry_from_axes`), git-re-basin
style, and checked numerically with :meth:`Symmetry.check`.

References:
  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617

  Ainsworth, Hayase, Srinivasa. *Git Re-Basin: Merging Models modulo
  Permutation Symmetries*, 2022. https://arxiv.org/abs/2209.04836
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import (
    Path,
    leaves_by_path,
    map_with_path,
    normalize_path,
    parse_path,
    path_str,
    paths_str,
)
from quotient_opt.symmetry._views import broadcast_along

PyTree = Any
Level = Literal["unit", "window"]
Role = Literal["kernel", "bias", "scale"]

__all__ = [
    "AxisRef",
    "Dense",
    "GroupElement",
    "Symmetry",
    "UnitGroup",
    "broadcast_along",
    "leaves_by_path",
    "map_with_path",
    "path_str",
    "solve_dtype",
    "symmetry_from_axes",
    "symmetry_from_layers",
]


# --------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class AxisRef:
    """Where a group's units sit along one axis of one parameter leaf.

    Attributes:
      path: the leaf's path, e.g. ``('fc1', 'kernel')``.
      axis: the axis of the leaf (non-negative).
      power: scale law: unit ``u``'s entries are multiplied by
        :math:`c_u^{\\text{power}}` (``+1`` producing, ``-1`` reading, ``0``
        permuted only).
      level: ``'unit'`` if the axis indexes the group's ``windows * pieces``
        units (piece ``j`` of window ``w`` is unit ``w * pieces + j``),
        ``'window'`` if it indexes its windows.
      role: ``'kernel'`` (a weight), ``'bias'`` (added), ``'scale'``
        (multiplied); informational, used to find a unit's bias.
      outer: the axis is read as ``outer`` blocks (a flattened feature map
        with channels last has ``outer = H * W``).
      offset: first position of the units in each block (a concatenation).
      inner: consecutive positions per unit (a flattened channels-first
        feature map has ``inner = H * W``).
    """

    path: Path
    axis: int
    power: int = 1
    level: Level = "unit"
    role: Role = "kernel"
    outer: int = 1
    offset: int = 0
    inner: int = 1

    def describe(self) -> str:
        """``path:axis ×law (role, level) [layout]``."""
        law = {1: "c", -1: "1/c", 0: "1"}.get(self.power, f"c^{self.power}")
        lay = []
        if self.outer != 1:
            lay.append(f"outer={self.outer}")
        if self.offset:
            lay.append(f"offset={self.offset}")
        if self.inner != 1:
            lay.append(f"inner={self.inner}")
        extra = f" [{', '.join(lay)}]" if lay else ""
        return f"{path_str(self.path)}:{self.axis} ×{law} ({self.role}, {self.level}s){extra}"


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """A set of interchangeable units and every parameter axis that holds them.

    Units are indexed as ``windows × pieces``: a ReLU layer of width ``n``
    has ``n`` windows of one piece; a max over ``k`` pieces has ``n / k``
    windows of ``k`` pieces, piece ``j`` of window ``w`` being unit
    ``w * k + j``.

    Attributes:
      name: a readable name (the producing layer's path).
      windows: number of windows ``W`` (units after the max over pieces).
      pieces: pieces per window ``k``.
      refs: every axis holding the group's units, with its scale law.
      permutable: whether windows may be permuted.
      pieces_permutable: whether pieces may be permuted within a window.
      rescalable: whether a positive scale per window is a symmetry.
      activation: what the units compute (``'relu'``, ``'max'``, ...).
      notes: why a symmetry is missing, for :meth:`Symmetry.describe`.
    """

    #: the group family's registry name (:mod:`~quotient_opt.symmetry._unit_kind`)
    kind: ClassVar[str] = "units"

    name: str
    windows: int
    pieces: int = 1
    refs: tuple[AxisRef, ...] = ()
    permutable: bool = True
    pieces_permutable: bool = True
    rescalable: bool = True
    activation: str = ""
    notes: tuple[str, ...] = ()

    @property
    def units(self) -> int:
        """``windows * pieces``."""
        return self.windows * self.pieces

    @property
    def windows_permutable(self) -> bool:
        """Alias of :attr:`permutable`."""
        return self.permutable

    def count(self, ref: AxisRef) -> int:
        """Number of positions a ref indexes: units or windows."""
        return self.units if ref.level == "unit" else self.windows

    def select(
        self, *, sign: int | None = None, level: Level | None = None, role: Role | None = None
    ) -> tuple[AxisRef, ...]:
        """The refs with a given sign of ``power``, ``level`` and ``role`` (``None``: any)."""
        return tuple(
            r
            for r in self.refs
            if (sign is None or np.sign(r.power) == sign)
            and (level is None or r.level == level)
            and (role is None or r.role == role)
        )

    @property
    def incoming(self) -> tuple[AxisRef, ...]:
        """Unit-level refs that produce the units (``power > 0``)."""
        return self.select(sign=1, level="unit")

    @property
    def outgoing(self) -> tuple[AxisRef, ...]:
        """Refs that read the units (``power < 0``)."""
        return self.select(sign=-1)

    @property
    def bias(self) -> AxisRef | None:
        """The unit-level bias ref, if the units have one."""
        return next(iter(self.select(sign=1, level="unit", role="bias")), None)

    @property
    def symmetric(self) -> bool:
        """Whether the group has any symmetry at all."""
        return self.permutable or self.rescalable or (self.pieces > 1 and self.pieces_permutable)

    def describe(self) -> str:
        """One line for the group, one per ref, one per note."""
        shape = f"{self.windows} units" if self.pieces == 1 else (
            f"{self.windows} windows × {self.pieces} pieces"
        )
        sym = []
        if self.permutable:
            sym.append("permutable")
        if self.pieces > 1 and self.pieces_permutable:
            sym.append("pieces permutable")
        if self.rescalable:
            sym.append("rescalable")
        head = f"{self.name}: {shape}, {self.activation or '?'}; " + (
            ", ".join(sym) if sym else "no symmetry"
        )
        lines = [head] + [f"    {r.describe()}" for r in self.refs]
        lines += [f"    - {n}" for n in self.notes]
        return "\n".join(lines)


class GroupElement(NamedTuple):
    """An element of one unit group's symmetry group (a pytree).

    Acting on unit-level axes, new unit ``(w, j)`` takes old unit
    ``(window_perm[w], piece_perm[w, j])`` times ``exp(power · log_scale[w])``;
    on window-level axes, new window ``w`` takes old window ``window_perm[w]``
    times the same factor.
    """

    window_perm: jax.Array
    """int32 ``(W,)``: new window ``w`` takes old window ``window_perm[w]``."""
    piece_perm: jax.Array
    """int32 ``(W, k)``: its piece ``j`` takes old piece ``piece_perm[w, j]``."""
    log_scale: jax.Array
    """float ``(W,)``: the log of the positive scale of window ``w`` (after the move)."""


Element = tuple[GroupElement, ...]


class OrbitElement(NamedTuple):
    """An element of the whole symmetry: the unit groups' element, then every factor's.

    :meth:`Symmetry.act` applies ``groups`` first (permutations and rescalings of the
    unit groups), then ``factors`` (one element per record of
    :attr:`Symmetry.factors`, e.g. the signs of each :class:`~quotient_opt.symmetry.SignFlip`),
    so ``sym.act(params, OrbitElement(g, f))`` is
    ``qo.symmetry`` ``act`` of ``f`` on ``sym.act(params, g)``. Returned where a
    result reaches a point of the orbit with the factors' help
    (:func:`~quotient_opt.canonicalize` with ``factors=True``,
    :func:`~quotient_opt.landscape.quotient_distance` on a model with sign flips).
    """

    groups: Element
    """The unit groups' element (one :class:`GroupElement` per group)."""
    factors: tuple[jax.Array, ...]
    """One element per factor, applied after ``groups``."""
LogScales = tuple[jax.Array, ...]


def default_float() -> Any:
    """float64 where enabled (``jax_enable_x64``), else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def solve_dtype(params: PyTree) -> Any:
    """Dtype for solves over the params: their float dtype, at least float32."""
    leaves = jax.tree.leaves(params)
    dt = jnp.result_type(*leaves) if leaves else jnp.float32
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.float32
    return jnp.promote_types(dt, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Symmetry:
    """The permutation and rescaling symmetries of a network, as data.

    Built by :func:`~quotient_opt.infer_symmetry` (tracing the model) or by
    :func:`symmetry_from_axes` (by hand). Hashable and immutable, so it can be
    closed over by jitted functions and Optax transformations.

    Attributes:
      groups: the unit groups that have a symmetry.
      shapes: the shape of every leaf the groups touch (checked by
        :meth:`validate`).
      dropped: groups found without any symmetry, kept for :meth:`describe`
        (and, after :meth:`restrict`, the groups that are no symmetry of the subtree).
      masked: the leaves masked out of the tree this symmetry was restricted to
        (:meth:`restrict`); :meth:`validate` does not ask for them.
      factors: symmetry factors of other kinds (records of a registered
        :class:`~quotient_opt.symmetry.Kind`: normalization scale invariance
        :class:`~quotient_opt.symmetry.NormScale`, sign flips
        :class:`~quotient_opt.symmetry.SignFlip`, ...), acting on top of the groups.
      dropped_factors: factors that are no symmetry of a subtree (:meth:`restrict`).
      program: the traced forward computation (inference only), used by the
        path norm; ``None`` for hand-written specs. Not part of equality or
        hashing: two symmetries with the same groups compare equal, so code
        compiled for one (``canonical_log_scales`` takes ``sym`` as a static
        argument) is reused for the other.
    """

    groups: tuple[UnitGroup, ...]
    shapes: tuple[tuple[Path, tuple[int, ...]], ...]
    dropped: tuple[UnitGroup, ...] = ()
    masked: tuple[Path, ...] = ()
    factors: tuple[Any, ...] = ()
    dropped_factors: tuple[Any, ...] = ()
    program: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        shapes = dict(self.shapes)
        for grp in self.groups + self.dropped:
            for ref in grp.refs:
                _check_ref(grp, ref, shapes)
            if grp.pieces < 1 or grp.windows < 1:
                raise ValueError(f"group '{grp.name}': windows and pieces must be >= 1")
        claimed: dict[tuple[Path, int], list[tuple[str, set[int]]]] = {}
        for grp in self.groups:
            for ref in grp.refs:
                pos = _positions(ref, grp.count(ref), shapes[ref.path][ref.axis])
                for other, opos in claimed.get((ref.path, ref.axis), []):
                    if pos & opos:
                        raise ValueError(
                            f"parameter '{path_str(ref.path)}' axis {ref.axis}: groups "
                            f"'{other}' and '{grp.name}' claim the same positions"
                        )
                claimed.setdefault((ref.path, ref.axis), []).append((grp.name, pos))
        for fac in self.factors + self.dropped_factors:
            for ref in fac.refs:
                if ref.path not in shapes:
                    raise ValueError(f"factor '{fac.name}': parameter '{path_str(ref.path)}' "
                                     "is not in shapes")
                if ref.axis >= len(shapes[ref.path]):
                    raise ValueError(f"factor '{fac.name}': parameter '{path_str(ref.path)}' "
                                     f"has no axis {ref.axis}")

    # ------------------------------------------------------------ description

    def describe(self) -> str:
        """Every group, its leaves and axes, and why a group is or is not rescalable."""
        lines = [f"Symmetry: {len(self.groups)} group(s) with a symmetry"]
        if self.masked:
            lines.append(f"restricted to a subtree: {len(self.masked)} leaf/leaves masked out "
                         f"({paths_str(self.masked)})")
        lines += [g.describe() for g in self.groups]
        if self.factors:
            lines.append(f"other kinds: {len(self.factors)} factor(s)")
            lines += [f.describe() for f in self.factors]
        if self.dropped_factors:
            lines.append(f"factors dropped on this subtree: {len(self.dropped_factors)}")
            lines += [f.describe() for f in self.dropped_factors]
        if self.dropped:
            lines.append(f"without symmetry: {len(self.dropped)} group(s)")
            lines += [g.describe() for g in self.dropped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        names = ", ".join(g.name for g in self.groups)
        return f"Symmetry(groups=[{names}])"

    # ------------------------------------------------------------ validation

    def validate(self, params: PyTree, *, what: str = "params") -> None:
        """Checks that ``params`` has every leaf this symmetry acts on, with its shape.

        ``optax.tree.map_params`` calls ``init`` with a leafless placeholder
        pytree; that is accepted (there is nothing to check).

        Args:
          params: the pytree to check.
          what: how to call it in the error message.

        Raises:
          ValueError: naming the first missing or mis-shaped parameter path.
        """
        if type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params):
            return
        leaves = leaves_by_path(params)
        for path, shape in self.shapes:
            if path in self.masked and path not in leaves:
                continue
            if path not in leaves:
                known = ", ".join(path_str(p) for p in list(leaves)[:8])
                raise ValueError(
                    f"{what}: no parameter at path '{path_str(path)}' (this Symmetry "
                    f"was built for another model; {what} has: {known})"
                )
            got = tuple(np.shape(leaves[path]))
            if got != shape:
                raise ValueError(
                    f"{what}: parameter '{path_str(path)}' has shape {got}, "
                    f"the Symmetry expects {shape} (it was built for another model)"
                )

    def restrict(self, tree: PyTree, *, what: str = "params") -> Symmetry:
        """This symmetry on the subtree ``tree`` holds: the groups that stay symmetries of it.

        ``optax.masked`` and ``optax.multi_transform`` give the transformation
        inside them the params with the leaves it does not handle replaced by
        ``optax.MaskedNode`` (equinox-style filtered trees hold ``None``). The
        transformation then moves the leaves present only, the others stay
        where they are or are moved by someone else. A group's moves are
        therefore kept only where acting on the present leaves alone is still
        exactly a symmetry of the function, whatever the masked leaves hold:

        * every ref present: the group is kept as it is;
        * a masked ref with a nonzero power (a kernel column or bias
          producing the units, a next layer's rows reading them): the group
          is dropped. Its rescaling multiplies that leaf by :math:`c` or
          :math:`1/c` and its permutations move it; doing either to the
          present leaves alone changes the function (frozen or not, the masked
          leaf is not moved along: ``relu(c·w·x + b) != c·relu(w·x + b)``);
        * masked refs with power 0 only (per-unit gains, permuted but never
          rescaled): the rescaling is kept, since it leaves those leaves alone
          in the whole model too, so it is the model's own rescaling; the
          permutations (which would have to permute the gains) are dropped.

        What was dropped is listed by :meth:`describe` (``print(sym)``) with
        the masked leaves that caused it.

        Args:
          tree: params (or any tree of the same leaves), possibly with masked
            leaves.
          what: how to call it in error messages.

        Returns:
          ``self`` when every leaf is present (or ``tree`` is Optax's leafless
          placeholder), else the restricted :class:`Symmetry` (no traced
          program: the path norm needs the whole tree).

        Raises:
          ValueError: for a present leaf whose shape differs from the
            symmetry's, or a missing leaf that ``tree`` does not mark as
            masked, or a subtree holding none of the symmetry's leaves
            without masked ones: then the symmetry was built for another model.
        """
        if not jax.tree.leaves(tree) and type(tree).__name__ == "_ParamsPlaceholder":
            return self
        leaves = leaves_by_path(tree)
        missing = [p for p, _ in self.shapes if p not in leaves]
        if not missing:
            self.validate(tree, what=what)
            return self
        holes = masked_paths(tree)
        masked = tuple(p for p in missing if any(p[: len(h)] == h for h in holes))
        absent = [p for p in missing if p not in masked]
        if absent:
            known = ", ".join(path_str(p) for p in list(leaves)[:8])
            raise ValueError(
                f"{what}: no parameter at path '{path_str(absent[0])}' (this Symmetry was built "
                f"for another model; {what} has: {known}; a subtree from optax.masked or "
                "optax.multi_transform marks the leaves it leaves out, and those are accepted)"
            )
        gone = set(masked)
        kept, dropped = [], []
        for grp in self.groups:
            lost = [r for r in grp.refs if r.path in gone]
            names = ", ".join(sorted({path_str(r.path) for r in lost}))
            if not lost:
                kept.append(grp)
            elif grp.rescalable and all(r.power == 0 for r in lost):
                kept.append(dataclasses.replace(
                    grp, refs=tuple(r for r in grp.refs if r.path not in gone),
                    permutable=False, pieces_permutable=False,
                    notes=(*grp.notes, (f"on this subtree: rescalable only ({names}, "
                                        "permuted with the units, is masked out)"))))
            else:
                dropped.append(dataclasses.replace(
                    grp, permutable=False, pieces_permutable=False, rescalable=False,
                    notes=(*grp.notes, (f"dropped on this subtree: {names} is masked out, "
                                        "and moving the other leaves alone changes the "
                                        "function"))))
        facs = [f for f in self.factors if not any(r.path in gone for r in f.refs)]
        lost_facs = tuple(f for f in self.factors if f not in facs)
        out = Symmetry(groups=tuple(kept), shapes=self.shapes,
                       dropped=tuple(dropped) + self.dropped, masked=masked,
                       factors=tuple(facs), dropped_factors=self.dropped_factors + lost_facs)
        out.validate(tree, what=what)  # the shapes of the leaves present
        return out

    def check(
        self,
        apply_fn: Callable[[PyTree, Any], Any],
        params: PyTree,
        x: Any,
        *,
        trials: int = 2,
        log_scale: float = 2.0,
        rtol: float | None = None,
        seed: int = 0,
    ) -> None:
        """Verifies numerically that every group's elements preserve the function.

        For each group, random elements acting on that group alone (random
        window and piece permutations, log-scales uniform in
        ``±log_scale``) are applied to ``params`` and to random parameters of
        the same shapes, and ``apply_fn(params, x)`` is compared with the
        original output, relative to the output's scale. The random
        parameters catch a leaf the spec leaves out whatever its value in
        ``params`` (a forgotten bias is zero at a fresh init).

        Args:
          apply_fn: ``apply_fn(params, x) -> outputs`` (any pytree).
          params: parameters this symmetry acts on.
          x: example input.
          trials: random elements per group.
          log_scale: bound of the log-scales.
          rtol: tolerance relative to the output scale (default ``1e-3`` in
            float32, ``1e-9`` in float64).
          seed: seed of the random elements.

        Raises:
          ValueError: naming the first group whose elements change the
            function, with the measured change.
        """
        from quotient_opt.symmetry._check import check

        self.validate(params)
        check(self, apply_fn, params, x, trials=trials, log_scale=log_scale, rtol=rtol, seed=seed)

    # ------------------------------------------------------------ group elements

    def identity(self, dtype: Any = None) -> Element:
        """The identity element.

        Args:
          dtype: dtype of its log-scales (default float64 where enabled, else float32).

        Returns:
          One :class:`GroupElement` per group: identity permutations, zero log-scales.
        """
        dtype = default_float() if dtype is None else dtype
        return tuple(
            GroupElement(
                jnp.arange(g.windows, dtype=jnp.int32),
                jnp.tile(jnp.arange(g.pieces, dtype=jnp.int32), (g.windows, 1)),
                jnp.zeros((g.windows,), dtype),
            )
            for g in self.groups
        )

    def sample(
        self,
        key: jax.Array,
        *,
        log_scale: float = 1.0,
        permute: bool = True,
        dtype: Any = None,
    ) -> Element:
        """A random group element.

        Args:
          key: PRNG key.
          log_scale: log-scales are drawn uniformly in ``[-log_scale, log_scale]``
            (zero on groups without a rescaling symmetry).
          permute: draw uniform random permutations (of windows and of pieces,
            where the group allows it).
          dtype: dtype of the log-scales (default float64 where enabled, else
            float32): drawn in that dtype, so float64 elements are exact to
            float64 rounding.
        """
        dtype = default_float() if dtype is None else dtype
        out = []
        for g, k in zip(self.groups, jax.random.split(key, max(len(self.groups), 1))):
            kw, kp, ks = jax.random.split(k, 3)
            wp = jnp.arange(g.windows, dtype=jnp.int32)
            if permute and g.permutable:
                wp = jax.random.permutation(kw, wp)
            pp = jnp.tile(jnp.arange(g.pieces, dtype=jnp.int32), (g.windows, 1))
            if permute and g.pieces > 1 and g.pieces_permutable:
                pp = jax.vmap(jax.random.permutation)(jax.random.split(kp, g.windows), pp)
            ls = jnp.zeros((g.windows,), dtype)
            if g.rescalable:
                ls = jax.random.uniform(ks, (g.windows,), dtype, -log_scale, log_scale)
            out.append(GroupElement(wp, pp.astype(jnp.int32), ls))
        return tuple(out)

    def compose(self, first: Element, second: Element) -> Element:
        """The element ``h`` with ``act(θ, h) == act(act(θ, first), second)``.

        Args:
          first: the element applied first.
          second: the element applied second.

        Returns:
          Their composition.

        Raises:
          TypeError: for an :class:`OrbitElement` (a factor's element does not in general
            commute with the permutations; compose the ``groups`` parts).
        """
        _groups_only(first, "compose")
        _groups_only(second, "compose")
        return tuple(compose_one(a, b) for a, b in zip(first, second))

    def inverse(self, g: Element) -> Element:
        """The element ``h`` with ``act(act(θ, g), h) == θ``.

        Args:
          g: a group element.

        Returns:
          Its inverse.

        Raises:
          TypeError: for an :class:`OrbitElement` (invert the ``groups`` part, and each
            factor's with its kind).
        """
        _groups_only(g, "inverse")
        return tuple(inverse_one(a) for a in g)

    def scales_only(self, log_scales: LogScales) -> Element:
        """The pure rescaling with the given per-window log-scales.

        Args:
          log_scales: one ``(windows,)`` array per group (ignored on groups
            without a rescaling symmetry).

        Returns:
          The element with identity permutations and these log-scales.
        """
        return tuple(
            GroupElement(
                jnp.arange(g.windows, dtype=jnp.int32),
                jnp.tile(jnp.arange(g.pieces, dtype=jnp.int32), (g.windows, 1)),
                jnp.asarray(s) if g.rescalable else jnp.zeros_like(s),
            )
            for g, s in zip(self.groups, log_scales)
        )

    def permutation_only(self, g: Element) -> Element:
        """``g`` with its log-scales set to zero.

        Args:
          g: a group element.

        Returns:
          Its permutation part.
        """
        return tuple(e._replace(log_scale=jnp.zeros_like(e.log_scale)) for e in g)

    def zero_log_scales(self, dtype: Any = jnp.float32) -> LogScales:
        """Zero vector of the log-scale (Lie algebra) space.

        Args:
          dtype: its dtype.

        Returns:
          One zero ``(windows,)`` array per group.
        """
        return tuple(jnp.zeros((g.windows,), dtype) for g in self.groups)

    # ------------------------------------------------------------ the action

    def act(self, params: PyTree, g: Element | OrbitElement, *, power: int = 1) -> PyTree:
        """Applies the group element ``g`` to a parameter pytree.

        Args:
          params: parameters (any pytree holding the leaves this symmetry names:
            an nnx ``State``, a filtered equinox model, a linen params dict).
          g: group element, e.g. from :meth:`sample`, or an :class:`OrbitElement`
            (the unit groups' element, then every factor's).
          power: how the tree transforms under rescaling, relative to the
            parameters: ``1`` for parameters, ``-1`` for gradients and first
            moments (covectors), ``-2`` for second moments, ``0`` for
            permutation only.

        Returns:
          The transformed pytree, same structure and dtypes.
        """
        self.validate(params)
        if isinstance(g, OrbitElement):
            from quotient_opt.symmetry import _kinds

            out = _apply(params, list(zip(self.groups, g.groups)), power)
            return _kinds.act(self, out, g.factors, power=power)
        return _apply(params, [(grp, e) for grp, e in zip(self.groups, g)], power)

    def act_group(self, params: PyTree, index: int, e: GroupElement, *, power: int = 1) -> PyTree:
        """Applies one group's element alone: :meth:`act` with the identity elsewhere.

        Args:
          params: parameters (or any tree of the same leaves).
          index: the group's index in :attr:`groups`.
          e: its element.
          power: as in :meth:`act`.

        Returns:
          The transformed tree.
        """
        return _apply(params, [(self.groups[index], e)], power)

    def rescale(self, tree: PyTree, log_scales: LogScales, *, power: int = 1) -> PyTree:
        """The pure rescaling by ``log_scales`` (no gathers): ``act(tree, scales_only(s))``.

        Args:
          tree: parameters (or any tree of the same leaves).
          log_scales: one ``(windows,)`` array per group.
          power: as in :meth:`act` (``1`` parameters, ``-1`` gradients, ...).

        Returns:
          The rescaled tree, same structure and dtypes.
        """
        self.validate(tree)
        ops: dict[Path, list[tuple[AxisRef, int, jax.Array]]] = {}
        for grp, s in zip(self.groups, log_scales):
            if not grp.rescalable:
                continue
            for ref in grp.refs:
                if ref.power == 0:
                    continue
                ls = jnp.repeat(jnp.asarray(s), grp.pieces) if ref.level == "unit" else s
                ops.setdefault(ref.path, []).append((ref, grp.count(ref), (power * ref.power) * ls))

        def apply(path: Path, x: Any) -> Any:
            if path not in ops or x is None:
                return x
            for ref, count, logc in ops[path]:
                x = views.scale(x, ref, count, jnp.exp(logc))
            return x

        return map_with_path(apply, tree)

    # ------------------------------------------------------------ infinitesimal action

    def tangent(self, params: PyTree, a: LogScales) -> PyTree:
        """The infinitesimal action :math:`J a = \\frac{d}{dt} \\exp(t a) \\cdot \\theta |_{t=0}`.

        Maps per-window log-scale velocities to a parameter-space tangent vector
        along the rescaling orbit (entries ``× power · a``). Entries of
        non-rescalable groups are ignored.

        Args:
          params: the point :math:`\\theta`.
          a: one ``(windows,)`` array per group.

        Returns:
          A params-shaped tangent vector.
        """
        dt = _leaf_dtype(params)
        zero = self.zero_log_scales(dt)
        a = tuple(jnp.asarray(x, dt) for x in a)
        return jax.jvp(lambda s: self.rescale(params, s), (zero,), (a,))[1]

    def cotangent(self, params: PyTree, v: PyTree) -> LogScales:
        """The transpose :math:`J^\\top v` of :meth:`tangent`.

        For a gradient ``v = ∇L(θ)`` of a rescaling-invariant loss this is zero
        (the Euclidean gradient has no vertical component).

        Args:
          params: the point :math:`\\theta`.
          v: a params-shaped vector.

        Returns:
          One ``(windows,)`` array per group.
        """
        zero = self.zero_log_scales(_leaf_dtype(params))
        _, vjp = jax.vjp(lambda s: self.rescale(params, s), zero)
        return vjp(v)[0]

    def num_parameters(self, params: PyTree) -> int:
        """The number of scalar parameters in ``params``."""
        return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def compose_one(a: GroupElement, b: GroupElement) -> GroupElement:
    """One group's ``a`` then ``b`` (see :meth:`Symmetry.compose`)."""
    wp = a.window_perm[b.window_perm]
    pp = jnp.take_along_axis(a.piece_perm[b.window_perm], b.piece_perm, axis=1)
    return GroupElement(wp, pp, a.log_scale[b.window_perm] + b.log_scale)


def inverse_one(a: GroupElement) -> GroupElement:
    """One group's inverse element (see :meth:`Symmetry.inverse`)."""
    wp = jnp.argsort(a.window_perm).astype(jnp.int32)
    pp = jnp.argsort(a.piece_perm[wp], axis=1).astype(jnp.int32)
    return GroupElement(wp, pp, -a.log_scale[wp])


def _groups_only(g: Any, who: str) -> None:
    if isinstance(g, OrbitElement):
        raise TypeError(f"Symmetry.{who}: takes the unit groups' element; this is an "
                        f"OrbitElement (pass its .groups)")


Ops = dict[Path, list[tuple[AxisRef, int, jax.Array, jax.Array | None]]]


def action_ops(pairs: list[tuple[UnitGroup, GroupElement]], power: int) -> Ops:
    """Per leaf path, the permutations and log-scales the ``(group, element)`` pairs apply."""
    ops: Ops = {}
    for grp, e in pairs:
        unit_perm = (e.window_perm[:, None] * grp.pieces + e.piece_perm).reshape(-1)
        for ref in grp.refs:
            unit = ref.level == "unit"
            perm = unit_perm if unit else e.window_perm
            logc = None
            if grp.rescalable and power != 0 and ref.power != 0:
                ls = jnp.repeat(e.log_scale, grp.pieces) if unit else e.log_scale
                logc = (power * ref.power) * ls
            ops.setdefault(ref.path, []).append((ref, grp.count(ref), perm, logc))
    return ops


def apply_ops(ops: Ops, path: Path, x: jax.Array) -> jax.Array:
    """One leaf after :func:`action_ops`' moves."""
    for ref, count, perm, logc in ops.get(path, ()):
        x = views.permute(x, ref, count, perm)
        if logc is not None:
            x = views.scale(x, ref, count, jnp.exp(logc))
    return x


def _apply(params: PyTree, pairs: list[tuple[UnitGroup, GroupElement]], power: int) -> PyTree:
    """The action of the given ``(group, element)`` pairs (see :meth:`Symmetry.act`)."""
    ops = action_ops(pairs, power)
    return map_with_path(lambda path, x: apply_ops(ops, path, x), params)


def _is_masked_node(x: Any) -> bool:
    """Optax's ``MaskedNode``: what ``optax.masked`` puts where it leaves a leaf out."""
    return type(x).__name__ == "MaskedNode" and type(x).__module__.startswith("optax")


def masked_paths(tree: PyTree, *, none: bool = True) -> list[Path]:
    """The paths of ``tree`` that hold a masked-out leaf or subtree: an Optax ``MaskedNode``,
    or (``none``) ``None``, as in the parts ``eqx.partition`` leaves out."""
    def hole(x: Any) -> bool:
        return _is_masked_node(x) or (none and x is None)

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=hole)
    return [normalize_path(p) for p, x in flat if hole(x)]


def _leaf_dtype(params: PyTree) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.float32


def _check_ref(grp: UnitGroup, ref: AxisRef, shapes: dict[Path, tuple[int, ...]]) -> None:
    where = f"group '{grp.name}', parameter '{path_str(ref.path)}'"
    if ref.path not in shapes:
        raise ValueError(f"{where}: no shape recorded for this leaf")
    shape = shapes[ref.path]
    if not 0 <= ref.axis < len(shape):
        raise ValueError(f"{where}: axis {ref.axis} out of range for shape {shape}")
    if ref.level not in ("unit", "window"):
        raise ValueError(f"{where}: level must be 'unit' or 'window', got {ref.level!r}")
    length, count = shape[ref.axis], grp.count(ref)
    if ref.outer < 1 or ref.inner < 1 or ref.offset < 0 or length % ref.outer:
        raise ValueError(f"{where}: axis {ref.axis} of size {length} has no {ref.outer} blocks")
    if ref.offset + count * ref.inner > length // ref.outer:
        raise ValueError(
            f"{where}: axis {ref.axis} (size {length}) cannot hold {count} "
            f"{ref.level}s × {ref.inner} at offset {ref.offset} in {ref.outer} block(s)"
        )


def _positions(ref: AxisRef, count: int, length: int) -> set[int]:
    b = length // ref.outer
    return {
        o * b + ref.offset + i
        for o in range(ref.outer)
        for i in range(count * ref.inner)
    }


# --------------------------------------------------------------------------- hand specs


def _parse_axis_entry(entry: Any, path: Path, axis: int) -> tuple[str, dict]:
    """``'h'`` (producing), ``'1/h'`` (reading), ``'=h'`` (permuted only) or a dict."""
    if isinstance(entry, Mapping):
        opts = dict(entry)
        if "group" not in opts:
            raise ValueError(f"parameter '{path_str(path)}' axis {axis}: a dict entry needs 'group'")
        return opts.pop("group"), opts
    if not isinstance(entry, str) or not entry:
        raise ValueError(
            f"parameter '{path_str(path)}' axis {axis}: expected None, a group name, "
            f"'1/name', '=name' or a dict, got {entry!r}"
        )
    if entry.startswith("1/"):
        return entry[2:], {"power": -1}
    if entry.startswith("="):
        return entry[1:], {"power": 0}
    return entry, {"power": 1}


def symmetry_from_axes(
    params: PyTree,
    axes: Mapping[str | Path, Sequence[Any]],
    *,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
) -> Symmetry:
    """Builds a :class:`Symmetry` by hand, one tuple of axis roles per parameter leaf.

    Like git-re-basin's permutation specs, each listed leaf gets one entry
    per axis: ``None`` (no group), ``'h'`` (the axis holds the units of group
    ``h`` and scales like them: ``× c``), ``'1/h'`` (it reads them: ``× 1/c``),
    ``'=h'`` (permuted only), or a dict with ``group`` and any
    :class:`AxisRef` field (``power``, ``level``, ``role``, ``outer``,
    ``offset``, ``inner``). Example, an MLP ``fc1 → relu → fc2 → relu → fc3``::

        sym = qo.symmetry_from_axes(params, {
            "fc1/kernel": (None, "h1"), "fc1/bias": ("h1",),
            "fc2/kernel": ("1/h1", "h2"), "fc2/bias": ("h2",),
            "fc3/kernel": ("1/h2", None),
        })
        sym.check(apply_fn, params, x)   # raises if an element changes the function

    A conv kernel ``(H, W, in, out)`` reads ``(None, None, '1/c1', 'c2')``; a
    dense layer after flattening an ``(H, W, C)`` map of group ``c2`` reads
    ``({'group': 'c2', 'power': -1, 'outer': H * W}, None)``.

    Args:
      params: the parameters (for the leaf shapes).
      axes: ``{leaf path: axis entries}``; paths as ``'a/b/0'`` strings or tuples.
      groups: per group, options of :class:`UnitGroup`: ``pieces`` (default
        1), ``permutable``, ``pieces_permutable``, ``rescalable`` (default
        ``True``), ``activation``. A group not listed gets the defaults.

    Returns:
      The :class:`Symmetry`; run :meth:`Symmetry.check` on it.

    Raises:
      ValueError: naming the leaf for a missing path, a wrong number of axis
        entries, or positions claimed twice.
    """
    leaves = leaves_by_path(params)
    groups = dict(groups or {})
    refs: dict[str, list[AxisRef]] = {}
    shapes: dict[Path, tuple[int, ...]] = {}
    for raw, entries in axes.items():
        path = parse_path(raw)
        if path not in leaves:
            raise ValueError(f"axes: no parameter at path '{path_str(path)}'")
        shape = tuple(np.shape(leaves[path]))
        shapes[path] = shape
        entries = tuple(entries)
        if len(entries) != len(shape):
            raise ValueError(
                f"axes: parameter '{path_str(path)}' has {len(shape)} axes, "
                f"{len(entries)} entries given"
            )
        for axis, entry in enumerate(entries):
            if entry is None:
                continue
            name, opts = _parse_axis_entry(entry, path, axis)
            power = int(opts.get("power", 1))
            opts.setdefault("level", "unit" if power > 0 else "window")
            if "role" not in opts:
                opts["role"] = "scale" if power == 0 else (
                    "bias" if len(shape) == 1 else "kernel")
            refs.setdefault(name, []).append(AxisRef(path=path, axis=axis, **opts))
    unknown = set(groups) - set(refs)
    if unknown:
        raise ValueError(f"groups: {sorted(unknown)} appear in no axis entry")
    out = []
    for name, rs in refs.items():
        opts = dict(groups.get(name, {}))
        pieces = int(opts.pop("pieces", 1))
        windows = opts.pop("windows", None)
        if windows is None:
            # a ref at offset 0 spanning its whole block fixes the count
            guesses = set()
            for r in rs:
                n = shapes[r.path][r.axis] // r.outer
                if r.offset == 0 and n % r.inner == 0:
                    n //= r.inner
                    guesses.add(n // pieces if r.level == "unit" else n)
            if len(guesses) != 1:
                raise ValueError(
                    f"group '{name}': cannot tell its number of windows from the axes; "
                    f"pass groups={{'{name}': {{'windows': W}}}}"
                )
            windows = guesses.pop()
        out.append(UnitGroup(name=name, windows=int(windows), pieces=pieces, refs=tuple(rs),
                             **opts))
    return Symmetry(groups=tuple(out), shapes=tuple(shapes.items()))


# --------------------------------------------------------------------------- dense chains


@dataclasses.dataclass(frozen=True)
class Dense:
    """One affine layer of a chain (for :func:`symmetry_from_layers`).

    Attributes:
      name: path of the layer, e.g. ``'layers/0'``.
      kernel: path of the weight matrix leaf.
      bias: path of the bias leaf, or ``None``.
      in_features: input width.
      out_features: output width.
      kernel_out_axis: axis of the kernel that indexes outputs (1 for flax's
        ``(in, out)`` kernels, 0 for equinox's ``(out, in)`` weights).
      activation: name of what follows the layer (``'relu'``, ``'max'``,
        ``'identity'``, ``'tanh'`` ...).
      homogeneous: whether that activation is positively homogeneous of degree 1.
      pieces: size of the max-pool window after the layer (1 for an
        elementwise activation).
    """

    name: str
    kernel: Path
    bias: Path | None
    in_features: int
    out_features: int
    kernel_out_axis: int
    activation: str = "identity"
    homogeneous: bool = True
    pieces: int = 1

    @property
    def kernel_in_axis(self) -> int:
        """The kernel axis indexing inputs."""
        return 1 - self.kernel_out_axis

    @property
    def outputs(self) -> int:
        """Width after the activation / pooling."""
        return self.out_features // self.pieces


def symmetry_from_layers(layers: Sequence[Dense]) -> Symmetry:
    """Builds the :class:`Symmetry` of a chain of affine layers, given by hand.

    Each layer's units form a group. Windows of a group are permutable and
    rescalable only if a later layer consumes them; pieces of a max-pool window
    are always permutable. The last layer's units (the network's outputs) have
    no symmetry unless they are max-pool pieces. The chain must be the whole
    network: a layer left out makes a wrong symmetry, so check the result
    with :meth:`Symmetry.check` (or use :func:`~quotient_opt.infer_symmetry`,
    which traces the model).

    Args:
      layers: the :class:`Dense` layers in execution order.

    Returns:
      The :class:`Symmetry` (without a traced program: no path norm).

    Raises:
      ValueError: for an empty chain or widths that do not chain.
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers: empty chain")
    for a, b in zip(layers, layers[1:]):
        if a.outputs != b.in_features:
            raise ValueError(
                f"layer '{b.name}' takes {b.in_features} inputs but layer '{a.name}' "
                f"gives {a.outputs} (after its activation '{a.activation}')"
            )
    groups = []
    shapes: dict[Path, tuple[int, ...]] = {}
    for i, lay in enumerate(layers):
        kshape = [0, 0]
        kshape[lay.kernel_out_axis] = lay.out_features
        kshape[lay.kernel_in_axis] = lay.in_features
        shapes[lay.kernel] = tuple(kshape)
        if lay.bias is not None:
            shapes[lay.bias] = (lay.out_features,)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is None and lay.pieces == 1:
            continue
        refs = [AxisRef(lay.kernel, lay.kernel_out_axis, 1, "unit", "kernel")]
        if lay.bias is not None:
            refs.append(AxisRef(lay.bias, 0, 1, "unit", "bias"))
        if nxt is not None:
            refs.append(AxisRef(nxt.kernel, nxt.kernel_in_axis, -1, "window", "kernel"))
        groups.append(
            UnitGroup(
                name=lay.name,
                windows=lay.outputs,
                pieces=lay.pieces,
                refs=tuple(refs),
                permutable=nxt is not None,
                rescalable=lay.homogeneous and nxt is not None,
                activation=lay.activation,
            )
        )
    return Symmetry(groups=tuple(groups), shapes=tuple(shapes.items()))
