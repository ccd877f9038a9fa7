"""Training loops: one full-batch ``lax.scan`` (:func:`fit`) and populations of
independent networks in one compiled program (:func:`train_population`), and
data-driven initialization of dense ReLU networks (:func:`place_kinks`)."""

from quotient_opt.training._fit import fit
from quotient_opt.training._kinks import dense_relu_chain, kink_init, place_kinks
from quotient_opt.training._population import (
    PopulationResult,
    PopulationStep,
    default_compiler_options,
    make_population_step,
    perturbed_init,
    shared_state_leaves,
    train_population,
)

__all__ = [
    "PopulationResult",
    "PopulationStep",
    "default_compiler_options",
    "dense_relu_chain",
    "fit",
    "kink_init",
    "make_population_step",
    "perturbed_init",
    "place_kinks",
    "shared_state_leaves",
    "train_population",
]
