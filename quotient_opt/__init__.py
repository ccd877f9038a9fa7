"""quotient_opt: optimization on neural-network weight space modulo its symmetries.

Optax gradient transformations that respect the permutation and positive
rescaling symmetries of neural networks, example flax.nnx models whose
training is hampered by those symmetries, and tools built on the group action.

flax and equinox are optional (``pip install quotient_opt[flax]``,
``[equinox]``, or both): ``import quotient_opt`` imports neither, models of
either framework are recognised once the user has imported it, and other
model types can be taught with :func:`~quotient_opt.symmetry.register_adapter`, and custom
primitives with :func:`~quotient_opt.symmetry.register_rule`.

Subpackages:

* :mod:`quotient_opt.symmetry`: the symmetry spec, its group action and canonical forms.
* :mod:`quotient_opt.transforms`: the Optax gradient transformations.
* :mod:`quotient_opt.training`: training loops (one network, or populations).
* :mod:`quotient_opt.landscape`: loss-landscape tools (NEB paths, Hessian spectra,
  trajectory PCA, interpolation).
* :mod:`quotient_opt.nn`: layers the symmetry machinery understands.
* :mod:`quotient_opt.models`: the example models and their tasks.
* :mod:`quotient_opt.contrib`: research tools of narrower scope (dense ReLU MLPs
  only: kink placement, breathing; Levenberg-Marquardt for small least squares).
"""

from quotient_opt import contrib, landscape, models, nn, symmetry, training, transforms
from quotient_opt._lazy import moved_getattr
from quotient_opt.symmetry import (
    AxisRef,
    CanonicalInfo,
    Dense,
    GroupElement,
    OrbitElement,
    Symmetry,
    UnitGroup,
    canonical_log_scales,
    canonicalize,
    infer_symmetry,
    register_adapter,
    register_rule,
    sort_permutation,
    symmetry_from_axes,
    symmetry_from_layers,
    unit_balance,
    unit_energies,
    unregister_rule,
)
from quotient_opt.training import (
    PopulationResult,
    fit,
    perturbed_init,
    shared_state_leaves,
    train_population,
)
from quotient_opt.transforms import (
    ADAMAX_LAWS,
    ADOPT_LAWS,
    ChainOrderWarning,
    adamp,
    add_decayed_weights,
    normalized_mask,
    sgdp,
    NotEquivariantWarning,
    RebalanceState,
    ReviveDeadUnitsState,
    TeleportState,
    check_chain,
    check_transportable,
    horizontal_component,
    keep_norms,
    KeepNormsState,
    map_state,
    measure_laws,
    path_norm_curvature,
    path_sgd,
    project_horizontal,
    quotient_adam,
    quotient_sgd,
    rebalance,
    register_wrapper_state,
    revive_dead_units,
    scale_by_path_norm,
    teleport,
    teleport_log_scales,
    transport_state,
)

__version__ = "0.1.0"

__all__ = [
    "ADAMAX_LAWS",
    "ADOPT_LAWS",
    "AxisRef",
    "ChainOrderWarning",
    "adamp",
    "add_decayed_weights",
    "normalized_mask",
    "sgdp",
    "NotEquivariantWarning",
    "CanonicalInfo",
    "Dense",
    "GroupElement",
    "OrbitElement",
    "PopulationResult",
    "RebalanceState",
    "ReviveDeadUnitsState",
    "Symmetry",
    "TeleportState",
    "UnitGroup",
    "canonical_log_scales",
    "canonicalize",
    "check_chain",
    "check_transportable",
    "contrib",
    "fit",
    "horizontal_component",
    "keep_norms",
    "KeepNormsState",
    "infer_symmetry",
    "landscape",
    "map_state",
    "measure_laws",
    "models",
    "nn",
    "path_norm_curvature",
    "path_sgd",
    "perturbed_init",
    "project_horizontal",
    "quotient_adam",
    "quotient_sgd",
    "rebalance",
    "register_adapter",
    "register_rule",
    "register_wrapper_state",
    "revive_dead_units",
    "scale_by_path_norm",
    "shared_state_leaves",
    "sort_permutation",
    "symmetry",
    "symmetry_from_axes",
    "symmetry_from_layers",
    "teleport",
    "teleport_log_scales",
    "train_population",
    "training",
    "transforms",
    "transport_state",
    "unit_balance",
    "unit_energies",
    "unregister_rule",
]

#: names that moved to :mod:`quotient_opt.contrib` (old spellings kept)
_MOVED = ("LevenbergMarquardtState", "kink_init", "levenberg_marquardt", "place_kinks")

__getattr__ = moved_getattr(__name__, "quotient_opt.contrib", _MOVED)
