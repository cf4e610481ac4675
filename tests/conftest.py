"""Test settings: small compiles matter more than fast kernels here."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
