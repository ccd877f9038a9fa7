"""Training loops: one full-batch ``lax.scan`` (:func:`fit`)."""

from quotient_opt.training._fit import fit

__all__ = ["fit"]
