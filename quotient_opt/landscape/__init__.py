"""Loss-landscape tools: minimum-energy paths, Hessian spectra, trajectory PCA, interpolation.

* :func:`neb`: nudged elastic band (improved tangent, climbing image) between
  two parameter vectors, relaxed by any Optax optimizer.
* :func:`hessian_spectrum`: the Hessian's eigenvalues, exact (dense), extreme
  (Lanczos) or as a density (stochastic Lanczos quadrature), optionally with
  ReLUs smoothed (:func:`with_smooth_relu`) and directions projected out.
* :func:`trajectory_pca` and its null baseline :func:`random_walk_pca`.
* :func:`interpolate`: the loss along a straight line.

These tools know nothing about symmetries; hooks (``align``, ``project``,
``project_out``) take the quotient machinery from :mod:`quotient_opt.symmetry`.
"""

from quotient_opt.landscape._hessian import HessianSpectrum, hessian_spectrum
from quotient_opt.landscape._interpolate import InterpolationResult, interpolate
from quotient_opt.landscape._neb import NEBResult, neb
from quotient_opt.landscape._pca import PCAResult, random_walk_pca, trajectory_pca
from quotient_opt.landscape._smooth import smooth_relu, with_smooth_relu

__all__ = [
    "HessianSpectrum",
    "InterpolationResult",
    "NEBResult",
    "PCAResult",
    "hessian_spectrum",
    "interpolate",
    "neb",
    "random_walk_pca",
    "smooth_relu",
    "trajectory_pca",
    "with_smooth_relu",
]
