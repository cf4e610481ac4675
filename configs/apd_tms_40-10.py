"""APD on TMS 40-10 (the same target as configs/tms_40-10.py), the APD paper's recipe (spec/apd.md):
C 50, m 11, batch top-k 1.0, faithfulness 1 / top-k recon 10 / Schatten 20 (p 0.9), gradient
attributions, Adam lr 1e-3 quarter-cosine with 5% warm-up, 20k steps, batch 2048. `:smoke`: seconds.
"""

from experiments.tms import tms_config
from spdjax.apd.config import shrink_for_smoke, to_apd


def get_config(arg=None):
    smoke = arg == "smoke"
    cfg = to_apd(
        tms_config(40, 10, identity=False, smoke=smoke),
        C=50, m=11, topk=1.0, coeffs=dict(faithfulness=1.0, topk_recon=10.0, schatten=20.0), schatten_p=0.9,
        lr=1e-3, schedule="cosine", warmup_frac=0.05, steps=20_000, batch_size=2048, init_type="xavier_normal",
    )
    return shrink_for_smoke(cfg) if smoke else cfg
