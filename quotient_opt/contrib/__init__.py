"""Research tools with a narrower scope than the rest of the library.

``quotient_opt.contrib`` holds tools that do not read the
:class:`~quotient_opt.symmetry.Symmetry` (the rest of the library derives
everything from its group action), as Optax's ``optax.contrib`` holds what is
useful but outside its core. Their scope, stated once here:

* **Dense ReLU MLPs only.** :func:`place_kinks`, :func:`kink_init`,
  :func:`breathe` and its pieces (:func:`grow_units`, :func:`merge_or_prune`,
  :func:`extract_units`, :func:`present_units`) recognize a chain of
  ``h @ kernel + bias`` with ReLU or identity activations from the jaxpr of
  ``apply_fn`` (:func:`dense_relu_chain`, the matcher of
  :func:`~quotient_opt.train_population`'s dense-MLP fast path) and refuse
  anything else (convolutions, max-pool, normalization, other activations)
  with a ``ValueError`` that says why. Inputs are ``(points, in_features)``.
* **Small least-squares problems.** :func:`levenberg_marquardt` needs a
  residual function and solves a ``min(N, P)``-sized linear system per step
  (a few thousand parameters or residuals at most); it has no symmetry.

They were written for the sawtooth network (``python -m benchmarks.sawtooth``).
The old spellings (``quotient_opt.place_kinks``, ``quotient_opt.kink_init``,
``quotient_opt.training.breathe``, ``quotient_opt.levenberg_marquardt``,
``quotient_opt.transforms.levenberg_marquardt``, ...) still resolve to these
objects.
"""

from quotient_opt.contrib._breathe import (
    BreatheResult,
    breathe,
    extract_units,
    grow_units,
    merge_or_prune,
    present_units,
)
from quotient_opt.contrib._kinks import dense_relu_chain, kink_init, place_kinks
from quotient_opt.contrib._levenberg_marquardt import (
    LevenbergMarquardtState,
    levenberg_marquardt,
)

__all__ = [
    "BreatheResult",
    "LevenbergMarquardtState",
    "breathe",
    "dense_relu_chain",
    "extract_units",
    "grow_units",
    "kink_init",
    "levenberg_marquardt",
    "merge_or_prune",
    "place_kinks",
    "present_units",
]
