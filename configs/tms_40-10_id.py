"""TMS 40-10 +ID: the SPD recipe of toy_models.md. `:smoke` shrinks it to run in seconds on CPU;
`:paper` is the paper's Table 1 recipe (no delta, faithfulness 1, 40k steps); `:reference` a later
PyTorch-reference recipe (shared CI MLP, PGD-recon-subset, 20k steps). E.g. `:paper,smoke`."""

from experiments.tms import config_args, tms_config


def get_config(arg=None):
    return tms_config(40, 10, identity=True, **config_args(arg, "tms_40-10_id"))
