"""Test settings: small compiles matter more than fast kernels here.

The tests mirror the package layout (tests/spdjax/..., tests/experiments/...); the shared helpers
(`helpers`, the float64 NumPy references `numpy_ref`, `numpy_ref_apd`) live next to this file.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA's persistent compilation cache, shared by the xdist workers and the subprocess runs they start:
# the smoke runs compile the same programs again and again (keys are the programs' hashes).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spdjax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

from browser import driver  # noqa: E402, F401  (the headless Chromium fixture, for every test that reads a page)
