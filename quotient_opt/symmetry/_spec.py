"""The symmetry group of a feed-forward network and its action on parameters.

A fully connected network computes the same function at :math:`\\theta` and at
:math:`g \\cdot \\theta` whenever :math:`g` permutes the hidden units of a layer
(moving their incoming and outgoing weights together) or, behind a positively
homogeneous activation :math:`\\sigma(cx) = c\\,\\sigma(x)` for :math:`c > 0`,
multiplies the incoming weights and bias of a unit by :math:`c` and its
outgoing weights by :math:`1/c`. For a max over the pieces of a window, the
pieces of one window share one scale (``max`` is jointly homogeneous) and may
be permuted among themselves.

Everything in the library derives from :meth:`Symmetry.act`. Its derivative in
the log-scales at the identity, :meth:`Symmetry.tangent`, spans the *vertical*
space (directions along the rescaling orbit); :meth:`Symmetry.cotangent` is
its transpose.

References:
  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617

  Ainsworth, Hayase, Srinivasa. *Git Re-Basin: Merging Models modulo
  Permutation Symmetries*, 2022. https://arxiv.org/abs/2209.04836
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str | int, ...]
PyTree = Any


# --------------------------------------------------------------------------- paths


def normalize_path(key_path: Sequence[Any]) -> Path:
    """Turns a JAX key path into a tuple of plain names and indices.

    The trailing ``.value`` of a flax ``Variable`` is dropped, so an nnx
    ``State`` leaf reads ``('layers', 0, 'kernel')``.
    """
    out: list[str | int] = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(k.key)
        else:  # pragma: no cover - exotic key types
            out.append(str(k))
    while out and out[-1] in ("value", "raw_value"):
        out.pop()
    return tuple(out)


def path_str(path: Path) -> str:
    """``('layers', 0, 'kernel')`` -> ``'layers/0/kernel'``."""
    return "/".join(str(p) for p in path)


def leaves_by_path(tree: PyTree) -> dict[Path, Any]:
    """Flat ``{path: leaf}`` view of a pytree (``None`` leaves skipped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {normalize_path(p): leaf for p, leaf in flat}


def map_with_path(fn: Callable[[Path, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` whose function also receives the normalized path."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x, *r: fn(normalize_path(p), x, *r), tree, *rest
    )


# --------------------------------------------------------------------------- structure


@dataclasses.dataclass(frozen=True)
class Dense:
    """One affine layer of the network's chain.

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
        return 1 - self.kernel_out_axis

    @property
    def outputs(self) -> int:
        """Width after the activation / pooling."""
        return self.out_features // self.pieces


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """The hidden units produced by one layer, with where they live in the params.

    Units are indexed as ``windows x pieces``: a ReLU layer of width ``n`` has
    ``n`` windows of one piece; a max-pool layer over ``k`` pieces has
    ``n / k`` windows of ``k`` pieces, piece ``j`` of window ``w`` being
    output ``w * k + j`` of the linear layer before it.

    Attributes:
      name: path of the layer producing the units.
      windows: number of windows ``W`` (= units after pooling).
      pieces: pieces per window ``k``.
      incoming: ``(leaf path, axis)`` pairs whose axis (size ``W * k``) holds
        the units' incoming parameters; scaled by ``c``.
      outgoing: ``(leaf path, axis)`` pairs whose axis (size ``W``) holds the
        units' outgoing weights; scaled by ``1 / c``.
      rescalable: whether positive rescaling is a symmetry (homogeneous
        activation *and* a following layer to absorb ``1 / c``).
      activation: the activation's name.
    """

    name: str
    windows: int
    pieces: int
    incoming: tuple[tuple[Path, int], ...]
    outgoing: tuple[tuple[Path, int], ...]
    rescalable: bool
    activation: str

    @property
    def units(self) -> int:
        return self.windows * self.pieces

    @property
    def windows_permutable(self) -> bool:
        """Windows may be permuted only if a later layer absorbs the permutation."""
        return bool(self.outgoing)


class GroupElement(NamedTuple):
    """An element of one unit group's symmetry group (a pytree).

    Acting on incoming parameters, new unit ``(w, j)`` takes old unit
    ``(window_perm[w], piece_perm[w, j])`` times ``exp(log_scale[w])``; new
    outgoing row ``w`` takes old row ``window_perm[w]`` times
    ``exp(-log_scale[w])``.
    """

    window_perm: jax.Array  # int32[W]
    piece_perm: jax.Array  # int32[W, k]
    log_scale: jax.Array  # float[W]


Element = tuple[GroupElement, ...]
LogScales = tuple[jax.Array, ...]


def _take(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    return jnp.take(x, idx, axis=axis)


def broadcast_along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    """Reshapes a vector so it broadcasts along ``axis`` of an ``ndim``-array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def solve_dtype(params: PyTree) -> Any:
    """Dtype for solves over the params: their float dtype, at least float32."""
    leaves = jax.tree.leaves(params)
    dt = jnp.result_type(*leaves) if leaves else jnp.float32
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.float32
    return jnp.promote_types(dt, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Symmetry:
    """The permutation and rescaling symmetries of a feed-forward network.

    Built by :func:`infer_symmetry`. Hashable and immutable, so it can be closed
    over by jitted functions and Optax transformations.

    Attributes:
      layers: the chain of affine layers, in execution order.
      groups: one :class:`UnitGroup` per hidden layer that has a symmetry.
      shapes: expected shape of every parameter leaf the symmetry touches.
    """

    layers: tuple[Dense, ...]
    groups: tuple[UnitGroup, ...]
    shapes: tuple[tuple[Path, tuple[int, ...]], ...]

    # ------------------------------------------------------------ validation

    def validate(self, params: PyTree, *, what: str = "params") -> None:
        """Checks that ``params`` has every leaf this symmetry acts on, with its shape.

        ``optax.tree.map_params`` calls ``init`` with a leafless placeholder
        pytree; that is accepted (there is nothing to check).

        Raises:
          ValueError: naming the first missing or mis-shaped parameter path.
        """
        if type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params):
            return
        leaves = leaves_by_path(params)
        for path, shape in self.shapes:
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
                    f"the Symmetry expects {shape}"
                )

    # ------------------------------------------------------------ group elements

    def identity(self, dtype: Any = jnp.float32) -> Element:
        """The identity element."""
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
        dtype: Any = jnp.float32,
    ) -> Element:
        """A random group element.

        Args:
          key: PRNG key.
          log_scale: log-scales are drawn uniformly in ``[-log_scale, log_scale]``
            (zero on groups without a rescaling symmetry).
          permute: draw uniform random permutations (of windows where a later
            layer absorbs them, of the pieces inside each window always).
          dtype: dtype of the log-scales.
        """
        out = []
        for g, k in zip(self.groups, jax.random.split(key, max(len(self.groups), 1))):
            kw, kp, ks = jax.random.split(k, 3)
            wp = jnp.arange(g.windows, dtype=jnp.int32)
            if permute and g.windows_permutable:
                wp = jax.random.permutation(kw, wp)
            pp = jnp.tile(jnp.arange(g.pieces, dtype=jnp.int32), (g.windows, 1))
            if permute and g.pieces > 1:
                pp = jax.vmap(jax.random.permutation)(jax.random.split(kp, g.windows), pp)
            ls = jnp.zeros((g.windows,), dtype)
            if g.rescalable:
                ls = jax.random.uniform(ks, (g.windows,), dtype, -log_scale, log_scale)
            out.append(GroupElement(wp, pp.astype(jnp.int32), ls))
        return tuple(out)

    def compose(self, first: Element, second: Element) -> Element:
        """The element ``h`` with ``act(θ, h) == act(act(θ, first), second)``."""
        out = []
        for a, b in zip(first, second):
            wp = a.window_perm[b.window_perm]
            pp = jnp.take_along_axis(a.piece_perm[b.window_perm], b.piece_perm, axis=1)
            ls = a.log_scale[b.window_perm] + b.log_scale
            out.append(GroupElement(wp, pp, ls))
        return tuple(out)

    def inverse(self, g: Element) -> Element:
        """The element ``h`` with ``act(act(θ, g), h) == θ``."""
        out = []
        for a in g:
            wp = jnp.argsort(a.window_perm).astype(jnp.int32)
            pp = jnp.argsort(a.piece_perm[wp], axis=1).astype(jnp.int32)
            ls = -a.log_scale[wp]
            out.append(GroupElement(wp, pp, ls))
        return tuple(out)

    def scales_only(self, log_scales: LogScales) -> Element:
        """The pure rescaling with the given per-window log-scales."""
        return tuple(
            GroupElement(
                jnp.arange(g.windows, dtype=jnp.int32),
                jnp.tile(jnp.arange(g.pieces, dtype=jnp.int32), (g.windows, 1)),
                jnp.asarray(s) if g.rescalable else jnp.zeros_like(s),
            )
            for g, s in zip(self.groups, log_scales)
        )

    def zero_log_scales(self, dtype: Any = jnp.float32) -> LogScales:
        """Zero vector of the log-scale (Lie algebra) space."""
        return tuple(jnp.zeros((g.windows,), dtype) for g in self.groups)

    # ------------------------------------------------------------ the action

    def act(self, params: PyTree, g: Element, *, power: int = 1) -> PyTree:
        """Applies the group element ``g`` to a parameter pytree.

        Args:
          params: parameters (any pytree holding the leaves this symmetry names:
            an nnx ``State``, a filtered equinox model, a linen params dict).
          g: group element, e.g. from :meth:`sample`.
          power: how the leaves transform under rescaling: ``1`` for
            parameters, ``-1`` for gradients and first moments (covectors),
            ``-2`` for second moments, ``0`` for permutation only.

        Returns:
          The transformed pytree, same structure and dtypes.
        """
        self.validate(params)
        ops: dict[Path, list[tuple[int, jax.Array, jax.Array | None]]] = {}
        for grp, e in zip(self.groups, g):
            unit_idx = (e.window_perm[:, None] * grp.pieces + e.piece_perm).reshape(-1)
            scale_in = scale_out = None
            if grp.rescalable and power != 0:
                scale_in = jnp.repeat(power * e.log_scale, grp.pieces)
                scale_out = -power * e.log_scale
            for path, axis in grp.incoming:
                ops.setdefault(path, []).append((axis, unit_idx, scale_in))
            for path, axis in grp.outgoing:
                ops.setdefault(path, []).append((axis, e.window_perm, scale_out))

        def apply(path: Path, x: jax.Array) -> jax.Array:
            for axis, idx, logc in ops.get(path, ()):
                x = _take(x, idx, axis)
                if logc is not None:
                    x = x * broadcast_along(jnp.exp(logc), x.ndim, axis).astype(x.dtype)
            return x

        return map_with_path(apply, params)

    # ------------------------------------------------------------ infinitesimal action

    def _scale(self, params: PyTree, log_scales: LogScales) -> PyTree:
        return self.act(params, self.scales_only(log_scales))

    def tangent(self, params: PyTree, a: LogScales) -> PyTree:
        """The infinitesimal action :math:`J a = \\frac{d}{dt} \\exp(t a) \\cdot \\theta |_{t=0}`.

        Maps per-window log-scale velocities to a parameter-space tangent vector
        along the rescaling orbit (incoming parameters ``× a``, outgoing ``× -a``).
        Entries of non-rescalable groups are ignored.
        """
        zero = self.zero_log_scales(_leaf_dtype(params))
        a = tuple(jnp.asarray(x, _leaf_dtype(params)) for x in a)
        return jax.jvp(lambda s: self._scale(params, s), (zero,), (a,))[1]

    def cotangent(self, params: PyTree, v: PyTree) -> LogScales:
        """The transpose :math:`J^\\top v` of :meth:`tangent`.

        For a gradient ``v = ∇L(θ)`` of a rescaling-invariant loss this is zero
        (the Euclidean gradient has no vertical component).
        """
        zero = self.zero_log_scales(_leaf_dtype(params))
        _, vjp = jax.vjp(lambda s: self._scale(params, s), zero)
        return vjp(v)[0]

    def num_parameters(self, params: PyTree) -> int:
        return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def _leaf_dtype(params: PyTree) -> Any:
    leaves = jax.tree.leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.float32


# --------------------------------------------------------------------------- activations

_HOMOGENEOUS = {"relu", "leaky_relu", "identity", "max"}


def _named_activations() -> dict[Any, str]:
    nn = jax.nn
    table = {
        nn.relu: "relu",
        nn.leaky_relu: "leaky_relu",
        nn.tanh: "tanh",
        jnp.tanh: "tanh",
        nn.sigmoid: "sigmoid",
        nn.softplus: "softplus",
        nn.gelu: "gelu",
        nn.silu: "silu",
        nn.elu: "elu",
        nn.relu6: "relu6",
    }
    return table


def classify_activation(fn: Any, where: str) -> tuple[str, bool]:
    """Returns ``(name, positively_homogeneous)`` for an activation callable.

    Known functions are looked up by identity (``functools.partial`` of them
    too). Anything else must be elementwise (checked numerically); whether it
    is positively homogeneous, :math:`\\sigma(cx) = c\\,\\sigma(x)` for
    ``c > 0``, is then checked numerically too.

    Raises:
      ValueError: if ``fn`` is not an elementwise callable, naming ``where``.
    """
    base = fn.func if isinstance(fn, functools.partial) else fn
    table = _named_activations()
    try:
        name = table.get(base)
    except TypeError:  # unhashable
        name = None
    if name is not None:
        return name, name in _HOMOGENEOUS
    if not callable(fn):
        raise ValueError(f"layer '{where}': {fn!r} is not a supported layer or activation")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7)), jnp.float32)
    try:
        y = jnp.asarray(fn(x))
        y_each = jnp.stack(
            [jnp.stack([jnp.asarray(fn(x[i, j : j + 1]))[0] for j in range(7)]) for i in range(2)]
        )
    except Exception as e:  # noqa: BLE001 - report any failure as unsupported
        raise ValueError(
            f"layer '{where}': cannot use {fn!r} as an activation ({type(e).__name__}: {e})"
        ) from e
    if y.shape != x.shape or not np.allclose(y, y_each, rtol=1e-5, atol=1e-6):
        raise ValueError(
            f"layer '{where}': {fn!r} is not an elementwise activation; only affine "
            "layers, elementwise activations and max-over-pieces are supported"
        )
    homogeneous = all(
        np.allclose(jnp.asarray(fn(c * x)), c * y, rtol=1e-5, atol=1e-6) for c in (0.37, 2.0, 5.5)
    )
    name = getattr(base, "__name__", type(base).__name__)
    return ("identity" if np.allclose(y, x) else name), homogeneous


# --------------------------------------------------------------------------- building


def symmetry_from_layers(layers: Sequence[Dense]) -> Symmetry:
    """Builds the :class:`Symmetry` of a chain of affine layers.

    Each layer's units form a group. Windows of a group are permutable and
    rescalable only if a later layer consumes them; pieces of a max-pool window
    are always permutable. The last layer's units (the network's outputs) have
    no symmetry unless they are max-pool pieces.
    """
    layers = tuple(layers)
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
        incoming = [(lay.kernel, lay.kernel_out_axis)]
        if lay.bias is not None:
            incoming.append((lay.bias, 0))
        outgoing = () if nxt is None else ((nxt.kernel, nxt.kernel_in_axis),)
        groups.append(
            UnitGroup(
                name=lay.name,
                windows=lay.outputs,
                pieces=lay.pieces,
                incoming=tuple(incoming),
                outgoing=outgoing,
                rescalable=lay.homogeneous and nxt is not None,
                activation=lay.activation,
            )
        )
    return Symmetry(layers=layers, groups=tuple(groups), shapes=tuple(shapes.items()))


def _nnx_layers(model: Any) -> list[Dense]:
    from flax import nnx

    from quotient_opt.nn import MaxOverPieces

    layers: list[Dense] = []
    pending: Dense | None = None
    for i, f in enumerate(model.layers):
        where = f"layers/{i}"
        if isinstance(f, nnx.Linear):
            if pending is not None:
                layers.append(pending)
            pending = Dense(
                name=where,
                kernel=("layers", i, "kernel"),
                bias=("layers", i, "bias") if f.use_bias else None,
                in_features=f.in_features,
                out_features=f.out_features,
                kernel_out_axis=1,
            )
            continue
        if pending is None or pending.activation != "identity" or pending.pieces != 1:
            raise ValueError(
                f"layer '{where}': {type(f).__name__} must directly follow an nnx.Linear "
                "(one activation or max-pool per linear layer)"
            )
        if isinstance(f, MaxOverPieces):
            if pending.out_features % f.pieces:
                raise ValueError(
                    f"layer '{where}': {pending.out_features} features do not split into "
                    f"windows of {f.pieces} pieces"
                )
            pending = dataclasses.replace(pending, activation="max", pieces=f.pieces)
        elif isinstance(f, nnx.Module):
            raise ValueError(
                f"layer '{where}': unsupported layer {type(f).__name__} (supported: "
                "nnx.Linear, elementwise activations, quotient_opt.models.MaxOverPieces)"
            )
        else:
            name, hom = classify_activation(f, where)
            pending = dataclasses.replace(pending, activation=name, homogeneous=hom)
    if pending is not None:
        layers.append(pending)
    if not layers:
        raise ValueError("model: no nnx.Linear layer found")
    return layers


def _eqx_mlp_layers(model: Any) -> list[Dense]:
    act, hom = classify_activation(model.activation, "activation")
    final, final_hom = classify_activation(model.final_activation, "final_activation")
    layers = []
    n = len(model.layers)
    for i, lin in enumerate(model.layers):
        if len(lin.weight.shape) != 2:  # e.g. eqx.nn.MLP(..., scan=True) stacks the layers
            raise ValueError(
                f"layer 'layers/{i}': weight of shape {tuple(lin.weight.shape)}; only "
                "eqx.nn.MLP with one 2-D Linear per layer (scan=False) is supported"
            )
        out_f, in_f = lin.weight.shape
        last = i == n - 1
        layers.append(
            Dense(
                name=f"layers/{i}",
                kernel=("layers", i, "weight"),
                bias=("layers", i, "bias") if lin.bias is not None else None,
                in_features=in_f,
                out_features=out_f,
                kernel_out_axis=0,
                activation=final if last else act,
                homogeneous=final_hom if last else hom,
            )
        )
    return layers


def _linen_layers(
    params: dict, layer_order: Sequence[str] | None, activation: Any
) -> list[Dense]:
    if layer_order is None:
        raise ValueError(
            "linen params: pass layer_order=[...] (the Dense layers' names in execution "
            "order; dict order is not execution order)"
        )
    prefix: Path = ()
    if "params" in params and layer_order and layer_order[0] not in params:
        prefix, params = ("params",), params["params"]
    acts = activation if isinstance(activation, (list, tuple)) else None
    layers = []
    for i, name in enumerate(layer_order):
        if name not in params or "kernel" not in params[name]:
            raise ValueError(f"linen params: no Dense layer '{path_str(prefix + (name,))}/kernel'")
        k = params[name]["kernel"]
        if np.ndim(k) != 2:
            raise ValueError(
                f"linen params: '{path_str(prefix + (name, 'kernel'))}' has shape "
                f"{np.shape(k)}; only Dense (2-D) kernels are supported"
            )
        in_f, out_f = np.shape(k)
        last = i == len(layer_order) - 1
        if last:
            act_name, hom = "identity", True
        else:
            fn = acts[i] if acts is not None else (activation or jax.nn.relu)
            act_name, hom = classify_activation(fn, path_str(prefix + (name,)))
        layers.append(
            Dense(
                name=path_str(prefix + (name,)),
                kernel=prefix + (name, "kernel"),
                bias=prefix + (name, "bias") if "bias" in params[name] else None,
                in_features=int(in_f),
                out_features=int(out_f),
                kernel_out_axis=1,
                activation=act_name,
                homogeneous=hom,
            )
        )
    return layers


def infer_symmetry(
    model: Any,
    *,
    layer_order: Sequence[str] | None = None,
    activation: Callable | Sequence[Callable] | None = None,
) -> Symmetry:
    """Infers the permutation and rescaling symmetries of a feed-forward model.

    Supported models:

    * ``flax.nnx.Sequential`` of ``nnx.Linear`` layers, each optionally followed
      by one elementwise activation or a :class:`quotient_opt.models.MaxOverPieces`.
      Parameters: ``nnx.state(model, nnx.Param)``.
    * ``equinox.nn.MLP``. Parameters: ``eqx.filter(model, eqx.is_array)``.
    * flax.linen Dense-MLP parameters (a dict, optionally under ``'params'``),
      with ``layer_order`` naming the Dense layers in execution order and
      ``activation`` the hidden activation (one callable, or one per hidden
      layer; default ReLU). Parameters: that dict.

    Hidden units of every layer consumed by a later layer may be permuted.
    Behind a positively homogeneous activation (ReLU, leaky ReLU, identity,
    max over pieces) they may also be rescaled. Activations without that
    property (tanh, sigmoid, softplus, GELU, SiLU, ELU) give permutations only.
    Pieces of a max-pool window may always be permuted among themselves and
    share one scale.

    Args:
      model: the model (or linen params dict).
      layer_order: linen only, the Dense layer names in execution order.
      activation: linen only, the hidden activation(s).

    Returns:
      The model's :class:`Symmetry`.

    Raises:
      ValueError: for an unsupported layer or activation, naming its path.
    """
    from flax import nnx

    if isinstance(model, nnx.Sequential):
        return symmetry_from_layers(_nnx_layers(model))
    try:
        import equinox as eqx

        if isinstance(model, eqx.nn.MLP):
            return symmetry_from_layers(_eqx_mlp_layers(model))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(model, dict) or hasattr(model, "keys"):
        return symmetry_from_layers(_linen_layers(dict(model), layer_order, activation))
    if isinstance(model, nnx.Module):
        raise ValueError(
            f"model: {type(model).__name__} is not an nnx.Sequential; build the network as "
            "nnx.Sequential(nnx.Linear(...), nnx.relu, ...) or pass its Sequential part"
        )
    raise ValueError(f"model: unsupported model type {type(model).__name__}")
