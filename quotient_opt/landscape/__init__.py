"""Loss-landscape tools: minimum-energy paths, Hessian spectra, trajectory PCA, interpolation.

* :func:`neb`: nudged elastic band (improved tangent, climbing image) between
  two parameter vectors, relaxed by any Optax optimizer.
* :func:`hessian_spectrum`: the Hessian's eigenvalues, exact (dense), extreme
  (Lanczos) or as a density (stochastic Lanczos quadrature), optionally with
  ReLUs smoothed (:func:`with_smooth_relu`) and directions projected out.
* :func:`trajectory_pca` and its null baseline :func:`random_walk_pca`.
* :func:`interpolate`: the loss along a straight line.
* :func:`symmetrize` and :func:`quotient_distance`: weight space modulo the
  network's permutations and rescalings (the sawtooth paper's symmetrization,
  and the distance between orbits by weight matching plus rescaling).

The path and spectrum tools know nothing about symmetries; their hooks
(``align``, ``project``, ``project_out``) take the quotient from
:func:`quotient_align`, :func:`canonical_section` and :func:`orbit_directions`.
"""

from quotient_opt.landscape._assignment import auction_assignment, exact_assignment
from quotient_opt.landscape._hessian import HessianSpectrum, hessian_spectrum
from quotient_opt.landscape._interpolate import InterpolationResult, interpolate
from quotient_opt.landscape._neb import NEBResult, neb
from quotient_opt.landscape._pca import PCAResult, random_walk_pca, trajectory_pca
from quotient_opt.landscape._quotient import (
    QuotientDistance,
    canonical_section,
    orbit_directions,
    quotient_align,
    quotient_distance,
    symmetrize,
)
from quotient_opt.landscape._smooth import smooth_relu, with_smooth_relu

__all__ = [
    "HessianSpectrum",
    "InterpolationResult",
    "NEBResult",
    "PCAResult",
    "QuotientDistance",
    "auction_assignment",
    "canonical_section",
    "exact_assignment",
    "hessian_spectrum",
    "interpolate",
    "neb",
    "orbit_directions",
    "quotient_align",
    "quotient_distance",
    "random_walk_pca",
    "smooth_relu",
    "symmetrize",
    "trajectory_pca",
    "with_smooth_relu",
]
