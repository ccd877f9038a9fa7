"""Optax gradient transformations on the quotient of weight space by the symmetry.

``levenberg_marquardt`` (no symmetry; small least-squares problems) moved to
:mod:`quotient_opt.contrib`; ``transforms.levenberg_marquardt`` still resolves
to it."""

from quotient_opt._lazy import moved_getattr
from quotient_opt.transforms._adamp import adamp, add_decayed_weights, normalized_mask, sgdp
from quotient_opt.transforms._aliases import quotient_adam, quotient_sgd
from quotient_opt.transforms._path_norm import path_norm_curvature, path_sgd, scale_by_path_norm
from quotient_opt.transforms._order import (
    ChainOrderWarning,
    NotEquivariantWarning,
    check_chain,
)
from quotient_opt.transforms._projection import horizontal_component, project_horizontal
from quotient_opt.transforms._rebalance import RebalanceState, rebalance
from quotient_opt.transforms._sphere import KeepNormsState, keep_norms
from quotient_opt.transforms._revive import ReviveDeadUnitsState, revive_dead_units
from quotient_opt.transforms._teleport import TeleportState, teleport, teleport_log_scales
from quotient_opt.transforms._transport import (
    ADAMAX_LAWS,
    ADOPT_LAWS,
    check_transportable,
    map_state,
    measure_laws,
    probe_laws,
    register_wrapper_state,
    transport_state,
)

__all__ = [
    "ADAMAX_LAWS",
    "ADOPT_LAWS",
    "ChainOrderWarning",
    "adamp",
    "add_decayed_weights",
    "normalized_mask",
    "sgdp",
    "NotEquivariantWarning",
    "check_chain",
    "check_transportable",
    "horizontal_component",
    "keep_norms",
    "KeepNormsState",
    "map_state",
    "measure_laws",
    "path_norm_curvature",
    "path_sgd",
    "probe_laws",
    "project_horizontal",
    "quotient_adam",
    "quotient_sgd",
    "rebalance",
    "RebalanceState",
    "register_wrapper_state",
    "revive_dead_units",
    "ReviveDeadUnitsState",
    "scale_by_path_norm",
    "teleport",
    "teleport_log_scales",
    "TeleportState",
    "transport_state",
]

#: names that moved to :mod:`quotient_opt.contrib`
_MOVED = ("LevenbergMarquardtState", "levenberg_marquardt")

__getattr__ = moved_getattr(__name__, "quotient_opt.contrib", _MOVED)
