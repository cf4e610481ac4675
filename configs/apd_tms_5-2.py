"""APD on TMS 5-2 (the same target as configs/tms_5-2.py), the APD reference recipe (spec/apd.md):
C 5, m 3, batch top-k 0.211, faithfulness 1 / top-k recon 1 / Schatten 0.7 (p 1), gradient
attributions, Adam lr 3e-2 constant with 5% warm-up, 20k steps, batch 2048. `:smoke`: seconds on CPU.
"""

from experiments.tms import tms_config
from spdjax.apd.config import shrink_for_smoke, to_apd


def get_config(arg=None):
    smoke = arg == "smoke"
    cfg = to_apd(
        tms_config(5, 2, identity=False, smoke=smoke),
        C=5, m=3, topk=0.211, coeffs=dict(faithfulness=1.0, topk_recon=1.0, schatten=0.7), schatten_p=1.0,
        lr=3e-2, schedule="constant", warmup_frac=0.05, steps=20_000, batch_size=2048, init_type="xavier_normal",
    )
    return shrink_for_smoke(cfg) if smoke else cfg
