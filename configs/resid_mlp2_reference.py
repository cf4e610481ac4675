"""ResidMLP 2 layers with the PyTorch reference's current recipe (see `resid_mlp_config`): shared_mlp CI
256, minimality 1e-4, lr 3e-4, 25k steps, stochastic-recon-subset 2 + PGD-recon-subset 2.

`:smoke` shrinks it to run in seconds on CPU. The spec's recipe is `configs/resid_mlp.py:2`.
"""

from experiments.resid_mlp import resid_mlp_config


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/resid_mlp2_reference.py: argument must be empty or 'smoke', got {arg!r}")
    return resid_mlp_config(2, smoke=arg == "smoke", recipe="reference")
