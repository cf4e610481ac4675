"""APD on TMS 40-10 (the same cached target as configs/tms_40-10.py), the APD paper's recipe (spec/apd.md):
C 50, m 11, batch top-k 1.0, faithfulness 1 / top-k recon 10 / Schatten 20 (p 0.9), gradient attributions,
Xavier-normal init, Adam 1e-3 with the reference's quarter cosine and 5% warm-up, 20k steps, batch 2048.
`:smoke`: seconds on CPU.
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "apd_tms_40-10", flags=("smoke",))
    C = 50
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.method = "apd"
    cfg.seed = 0
    cfg.target = dict(  # as configs/tms_40-10.py
        n_features=40, n_hidden=10, steps=10_000, batch_size=8192, lr=5e-3, weight_decay=0.01, feature_prob=0.05,
        seed=0, bias_init_zero=True, require_all_features=True, max_seed_tries=20, probe_value=0.75,
        probe_tol=0.2, weights_path="",
    )
    cfg.sites = (("linear1", C), ("linear2", C))
    cfg.tied = (("linear2", "linear1"),)
    cfg.identity = ()
    cfg.apd = dict(
        C=C, m=11, topk=1.0, batch_topk=True, attribution="gradient",
        coeffs=dict(faithfulness=1.0, topk_recon=10.0, act_recon=0.0, schatten=20.0, lp_sparsity=0.0),
        schatten_p=0.9, schatten_eps=1e-16, lp_p=1.0, unit_norm_A=False, init_scale=1.0, init_type="xavier_normal",
    )
    cfg.optim = dict(steps=20_000, lr=1e-3, schedule="apd_cosine", warmup_frac=0.05, faithfulness_warmup_steps=0)
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
