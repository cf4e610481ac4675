"""TMS 5-2: the SPD recipe of toy_models.md. `:smoke` shrinks it to run in seconds on CPU;
`:paper` is the paper's Table 1 recipe (no delta, faithfulness 1, 40k steps), e.g. `:paper,smoke`."""

from experiments.tms import config_args, tms_config


def get_config(arg=None):
    return tms_config(5, 2, identity=False, **config_args(arg, "tms_5-2"))
