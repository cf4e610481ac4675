"""`python -m spdjax.kernels`: build the CPU kernels for this machine and say whether they loaded."""

import sys

from spdjax import kernels

ok = kernels.load()
print(f"spdjax CPU kernels: {kernels.status()}")
sys.exit(0 if ok else 1)
