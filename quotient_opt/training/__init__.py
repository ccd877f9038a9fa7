"""Training loops: one full-batch ``lax.scan`` (:func:`fit`) and populations of
independent networks in one compiled program (:func:`train_population`).

Kink placement and breathing (dense ReLU MLPs only) moved to
:mod:`quotient_opt.contrib`; their old names here (``training.place_kinks``,
``training.breathe``, ...) still resolve to the same objects."""

from quotient_opt._lazy import moved_getattr
from quotient_opt.training._fit import fit
from quotient_opt.training._population import (
    PopulationResult,
    PopulationStep,
    default_compiler_options,
    make_population_step,
    perturbed_init,
    train_population,
)
from quotient_opt.training._shared_state import POPULATION_AXIS, shared_state_leaves

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

#: names that moved to :mod:`quotient_opt.contrib`
_MOVED = ("BreatheResult", "breathe", "dense_relu_chain", "extract_units", "grow_units",
          "kink_init", "merge_or_prune", "place_kinks", "present_units")

__getattr__ = moved_getattr(__name__, "quotient_opt.contrib", _MOVED)
