"""Test configuration.

float64 is enabled for the whole test session so float64 paths can be tested;
every float32 test creates float32 arrays explicitly (the models' default
``param_dtype`` and the tasks' default ``dtype`` are float32).
"""

import os

import jax
from hypothesis import settings

jax.config.update("jax_enable_x64", True)

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
