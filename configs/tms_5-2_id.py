"""TMS 5-2 +ID: the SPD recipe of toy_models.md. `:smoke` shrinks it to run in seconds on CPU."""

from experiments.tms import tms_config


def get_config(arg=None):
    return tms_config(5, 2, identity=True, smoke=arg == "smoke")
