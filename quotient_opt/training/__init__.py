"""Training loops: one full-batch ``lax.scan`` (:func:`fit`) and populations of
independent networks in one compiled program (:func:`train_population`)."""

from quotient_opt.training._fit import fit
from quotient_opt.training._population import (
    POPULATION_AXIS,
    PopulationResult,
    PopulationStep,
    default_compiler_options,
    make_population_step,
    perturbed_init,
    shared_state_leaves,
    train_population,
)

__all__ = [
    "POPULATION_AXIS",
    "PopulationResult",
    "PopulationStep",
    "default_compiler_options",
    "fit",
    "make_population_step",
    "perturbed_init",
    "shared_state_leaves",
    "train_population",
]
