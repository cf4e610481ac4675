"""APD on TMS 5-2 (the same cached target as configs/tms_5-2.py), the APD reference recipe (spec/apd.md):
C 5, m 3, batch top-k 0.211, faithfulness 1 / top-k recon 1 / Schatten 0.7 (p 1), gradient attributions,
Xavier-normal init, Adam 3e-2 constant with 5% warm-up, 20k steps, batch 2048. `:smoke`: seconds on CPU.
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "apd_tms_5-2", flags=("smoke",))
    C = 5
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.method = "apd"
    cfg.seed = 0
    cfg.target = dict(  # as configs/tms_5-2.py
        n_features=5, n_hidden=2, steps=10_000, batch_size=1024, lr=5e-3, weight_decay=0.01, feature_prob=0.05,
        seed=0, bias_init_zero=False, require_all_features=True, max_seed_tries=20, probe_value=0.75,
        probe_tol=0.1, weights_path="",
    )
    cfg.sites = (("linear1", C), ("linear2", C))
    cfg.tied = (("linear2", "linear1"),)
    cfg.identity = ()
    cfg.apd = dict(
        C=C, m=3, topk=0.211, batch_topk=True, attribution="gradient",
        coeffs=dict(faithfulness=1.0, topk_recon=1.0, act_recon=0.0, schatten=0.7, lp_sparsity=0.0),
        schatten_p=1.0, schatten_eps=1e-16, lp_p=1.0, unit_norm_A=False, init_scale=1.0, init_type="xavier_normal",
    )
    cfg.optim = dict(steps=20_000, lr=3e-2, schedule="constant", warmup_frac=0.05, faithfulness_warmup_steps=0)
    cfg.batch_size = cfg.eval_batch_size = 2048
    cfg.log_every, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.eval_every, cfg.figures_every = 100, 1000, 3, 1000, 0
    cfg.mesh = dict(data=0, model=1)  # data=0: every device (spdjax.sharding.MeshConfig)
    cfg.precision = dict(param_dtype="float32", compute_dtype="float32")

    if a.smoke:
        cfg.target.update(steps=300, batch_size=256, require_all_features=False)
        cfg.optim.steps = 20
        cfg.batch_size = cfg.eval_batch_size = 128
        cfg.log_every = cfg.checkpoint_every = 10
        cfg.eval_every = 20
    return cfg
