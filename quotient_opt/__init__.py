"""quotient_opt: optimization on neural-network weight space modulo its symmetries.

Optax gradient transformations that respect the permutation and positive
rescaling symmetries of feed-forward networks, example flax.nnx models whose
training is hampered by those symmetries, and tools built on the group action.
"""

from quotient_opt import models
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
    "Dense",
    "GroupElement",
    "Symmetry",
    "UnitGroup",
    "infer_symmetry",
    "models",
    "symmetry_from_layers",
]
