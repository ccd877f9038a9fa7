"""Training loops: one full-batch ``lax.scan`` (:func:`fit`) and populations of
independent networks in one compiled program (:func:`train_population`), and
data-driven initialization of dense ReLU networks (:func:`place_kinks`) and
width cycles for them (:func:`breathe`)."""

from quotient_opt.training._breathe import (
    BreatheResult,
    breathe,
    extract_units,
    grow_units,
    merge_or_prune,
    present_units,
)
from quotient_opt.training._fit import fit
from quotient_opt.training._kinks import dense_relu_chain, kink_init, place_kinks
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
    "BreatheResult",
    "PopulationResult",
    "PopulationStep",
    "breathe",
    "default_compiler_options",
    "dense_relu_chain",
    "extract_units",
    "fit",
    "grow_units",
    "kink_init",
    "make_population_step",
    "merge_or_prune",
    "perturbed_init",
    "place_kinks",
    "present_units",
    "shared_state_leaves",
    "train_population",
]
