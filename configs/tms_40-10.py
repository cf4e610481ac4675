"""TMS 40-10: the SPD recipe of toy_models.md. `:smoke` shrinks it to run in seconds on CPU."""

from experiments.tms import tms_config


def get_config(arg=None):
    return tms_config(40, 10, identity=False, smoke=arg == "smoke")
