"""Symmetry inference by tracing: follow the unit axes of every weight through the jaxpr.

The forward computation ``apply_fn(params, x)`` is traced to a jaxpr and
interpreted abstractly. Every ``dot_general`` or ``conv_general_dilated``
whose one operand is a parameter leaf (the kernel) and whose other operand
depends on the input starts a *unit group*: the kernel's output-feature axis.
The analysis then follows, for every intermediate value, which of its axes
hold which group's units (a *label*: group and unit index per position), and
whether the value scales with the units (degree 1: ``c · z``) or is invariant
(degree 0: a mask ``z > 0``). Parameters met along the way get their roles:
a leaf added to a labelled value is a bias (scales like it), a leaf
multiplied with it is a per-unit gain (permuted only), a kernel contracting
a labelled axis reads the units (scales by ``1/c``).

Rules, each sound on its own (what cannot be shown safe gets fewer
symmetries, never a wrong one):

* positively homogeneous elementwise operations keep the degree: ``max(z,
  0)`` (ReLU), ``min``, ``abs``, ``neg``, multiplication by constants,
  ``select`` on sign tests (leaky ReLU); any other elementwise operation
  (``tanh``, ``exp``, powers, ``+ 1``) keeps the permutation symmetry but
  *taints* the groups of a degree-1 input: they lose the rescaling;
* a max (or min) over the pieces of a reshaped feature axis makes a maxout /
  max-pool group (its pieces share a scale and may be permuted);
* pooling over space (``reduce_window``), reductions over other axes,
  reshapes (flatten), transposes, broadcasts, concatenations, slices and
  padding of other axes keep the labels; a sum or max over the feature axis
  is permutation-invariant and taints the rescaling;
* adding two labelled values (a residual connection) merges their groups:
  one permutation and one scale shared by every writer and reader of the
  stream;
* a lookup in a parameter table (``gather``: an embedding) starts a unit group on
  the table's feature axis, like a kernel;
* anything else that touches a labelled value (a contraction with data, as
  in attention; normalizations by non-parameter statistics; unknown
  primitives, unless :func:`~quotient_opt.symmetry.register_rule` taught
  them; control flow) removes that group's symmetries, and a labelled
  value reaching an output removes them too (outputs are fixed).

Finally a leaf axis used in several places must be transformed the same way
by all of them, or its groups lose their symmetry. The result is then
checked numerically by :func:`~quotient_opt.infer_symmetry`.

The package: abstract values and labels (``_values``), the analysis state and
its unit groups (``_analysis``), the rule table (``_registry``, open to users
through :func:`~quotient_opt.symmetry.register_rule`) and the rules by family:
contractions (``_linear``), table lookups (``_gather``), elementwise operations
(``_elementwise``),
reductions (``_reductions``), shape operations (``_shapes``), control flow and
calls (``_control``). The rules run on the library's jaxpr interpreter
(``quotient_opt._jaxpr``).

References:
  Martens, Grosse. *Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature*, 2015 (kfac-jax's graph matcher finds layers in
  jaxprs). https://arxiv.org/abs/1503.05671
"""

from quotient_opt.symmetry._tracer import (  # noqa: F401 - the rule modules register their rules
    _control,
    _elementwise,
    _gather,
    _linear,
    _reductions,
    _shapes,
)
from quotient_opt.symmetry._tracer._analysis import Analysis, analyze
from quotient_opt.symmetry._tracer._registry import register_rule, unregister_rule

__all__ = ["Analysis", "analyze", "register_rule", "unregister_rule"]
