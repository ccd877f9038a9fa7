"""The symmetry group of a network: its spec, its action on parameters, canonical forms."""

from quotient_opt.symmetry._adapters import register_adapter
from quotient_opt.symmetry._canonical import (
    CanonicalInfo,
    canonical_log_scales,
    canonicalize,
    sort_permutation,
    unit_balance,
    unit_energies,
)
from quotient_opt.symmetry._infer import infer_symmetry
from quotient_opt.symmetry._kinds import Kind, only, register_kind
from quotient_opt.symmetry._norm_scale import NormScale
from quotient_opt.symmetry._sign_flip import SignFlip
from quotient_opt.symmetry import _unit_kind  # noqa: F401  (registers the unit groups' kind)
from quotient_opt.symmetry._paths import leaves_by_path, map_with_path, path_str
from quotient_opt.symmetry._program import Program
from quotient_opt.symmetry._spec import (
    AxisRef,
    Dense,
    GroupElement,
    OrbitElement,
    Symmetry,
    UnitGroup,
    symmetry_from_axes,
    symmetry_from_layers,
)
from quotient_opt.symmetry._tracer import register_rule, unregister_rule

__all__ = [
    "AxisRef",
    "CanonicalInfo",
    "Dense",
    "GroupElement",
    "Kind",
    "NormScale",
    "OrbitElement",
    "Program",
    "SignFlip",
    "Symmetry",
    "UnitGroup",
    "canonical_log_scales",
    "canonicalize",
    "infer_symmetry",
    "leaves_by_path",
    "map_with_path",
    "only",
    "path_str",
    "register_adapter",
    "register_kind",
    "register_rule",
    "sort_permutation",
    "symmetry_from_axes",
    "symmetry_from_layers",
    "unit_balance",
    "unit_energies",
    "unregister_rule",
]
