"""quotient_opt: optimization on neural-network weight space modulo its symmetries.

Optax gradient transformations that respect the permutation and positive
rescaling symmetries of feed-forward networks, example flax.nnx models whose
training is hampered by those symmetries, and tools built on the group action.
"""

from quotient_opt import models, training
from quotient_opt._aliases import quotient_adam, quotient_sgd
from quotient_opt._canonical import (
    CanonicalInfo,
    canonical_log_scales,
    canonicalize,
    sort_permutation,
    unit_balance,
    unit_energies,
)
from quotient_opt._rebalance import RebalanceState, rebalance
from quotient_opt._teleport import TeleportState, teleport, teleport_log_scales
from quotient_opt._path_norm import path_norm_curvature, path_sgd, scale_by_path_norm
from quotient_opt._projection import horizontal_component, project_horizontal
from quotient_opt._revive import ReviveDeadUnitsState, revive_dead_units
from quotient_opt.training import fit
from quotient_opt._symmetry import (
    Dense,
    GroupElement,
    Symmetry,
    UnitGroup,
    infer_symmetry,
    symmetry_from_layers,
)

__version__ = "0.1.0"

__all__ = [
    "CanonicalInfo",
    "RebalanceState",
    "TeleportState",
    "canonical_log_scales",
    "canonicalize",
    "quotient_adam",
    "quotient_sgd",
    "rebalance",
    "sort_permutation",
    "teleport",
    "teleport_log_scales",
    "unit_balance",
    "unit_energies",
    "horizontal_component",
    "path_norm_curvature",
    "path_sgd",
    "project_horizontal",
    "ReviveDeadUnitsState",
    "revive_dead_units",
    "scale_by_path_norm",
    "Dense",
    "GroupElement",
    "Symmetry",
    "UnitGroup",
    "infer_symmetry",
    "fit",
    "models",
    "training",
    "symmetry_from_layers",
]
