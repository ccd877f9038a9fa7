"""Tracer rule of ``gather``: embedding lookups produce units.

``table[ids]`` (``jnp.take``, ``nnx.Embed``, ``eqx.nn.Embedding``, linen's
``Embed``) picks rows of a parameter leaf. The table's feature axis (the one axis
carried whole into the output) then holds the units of a new group, like a
kernel's output axis: the lookup is a layer with one-hot inputs, so permuting or
rescaling the table's columns permutes or rescales every looked-up vector. A
positional table picked by constant indices (``pos(jnp.arange(T))``) is a layer
too; added to the token embeddings, the two merge into one residual stream. A
gather of data, or one whose indices carry units, is not followed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt.symmetry._paths import path_str
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import builtin
from quotient_opt.symmetry._tracer._values import Data, Info, Lab, Param
from quotient_opt.symmetry._tracer._values import out_shapes as shapes_of


@builtin("gather")
def gather(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    """Rows of a parameter table picked by (unlabelled) indices: a new unit group on the
    table's one whole feature axis."""
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    table, idx = ins
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    if (not isinstance(table, Param) or dn.operand_batching_dims
            or (isinstance(idx, Data) and idx.labs) or not isinstance(idx, Data)):
        return an.unknown(ins, out_shapes, f"{where}: a gather that is not a table lookup")
    kept = [a for a in range(len(table.shape)) if a not in dn.collapsed_slice_dims]
    # a slice as long as its axis starts at 0 when indices are clipped or promised in
    # bounds (eqx.nn.Embedding indexes the feature axis at 0 that way)
    clipped = str(eqn.params.get("mode")).rsplit(".", 1)[-1] in ("CLIP", "PROMISE_IN_BOUNDS")
    whole = [a for a in kept
             if sizes[a] == table.shape[a] and table.axes[a] is not None
             and (a not in dn.start_index_map or clipped)]
    shape = out_shapes[0]
    if len(whole) != 1:  # no single feature axis: the table is read without units
        an.use(table, {}, where)
        return [Data(shape, taint=idx.taint)]
    axis = whole[0]
    n = table.shape[axis]
    path = an.paths[table.leaf]
    gid = an.new_group(n, path_str(path[:-1]) if len(path) > 1 else path_str(path))
    lab = Lab((0,), np.full(n, gid), np.arange(n), np.zeros(n, int), np.ones(n, int))
    an.use(table, {axis: (lab, np.ones(n, int), "kernel")}, where)
    out_axis = dn.offset_dims[kept.index(axis)]
    return [Data(shape, (lab.replace(axes=(out_axis,)),), idx.taint)]
