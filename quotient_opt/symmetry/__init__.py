"""The symmetry group of a network: its spec, its action on parameters, canonical forms."""

from quotient_opt.symmetry._canonical import (
    CanonicalInfo,
    canonical_log_scales,
    canonicalize,
    sort_permutation,
    unit_balance,
    unit_energies,
)
from quotient_opt.symmetry._spec import (
    Dense,
    GroupElement,
    Symmetry,
    UnitGroup,
    infer_symmetry,
    symmetry_from_layers,
)

__all__ = [
    "CanonicalInfo",
    "Dense",
    "GroupElement",
    "Symmetry",
    "UnitGroup",
    "canonical_log_scales",
    "canonicalize",
    "infer_symmetry",
    "sort_permutation",
    "symmetry_from_layers",
    "unit_balance",
    "unit_energies",
]
