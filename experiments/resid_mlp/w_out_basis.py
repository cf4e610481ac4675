"""Which W_out decomposition does the SPD objective prefer on ResidMLP 1 layer? A hand-built comparison.

    python -m experiments.resid_mlp.w_out_basis [--config=configs/resid_mlp.py] [--batches=20]

The paper reports W_out as one dense rank-50 block (all 50 subcomponents co-active whenever a feature
is active); spdjax's runs find a rank-50 block in the ReLU-neuron basis instead. This script builds
both by hand on the cached target and evaluates the run config's own loss (`spdjax.loss_fn`, same
terms, coefficients, sigmoid and masks) on held-out batches, so the two can be compared without
training:

- W_in (both): exact per-feature subcomponents on the data: V = the dual basis of the embedding
  (`W_E^T (W_E W_E^T)^-1`, so `r V = x`), U_i = W_E[i] W_in; CI_i = clip(k |x_i|, 0, 1).
- W_out `neuron`: V = the first 50 unit vectors (one per neuron), U = W_out's rows; CI_n = clip(k a_n, 0, 1).
- W_out `dense`: V = a random orthogonal 50 x 50 matrix Q, U = Q^T W_out; CI_c = clip(k |a Q_c|, 0, 1),
  i.e. ~1 for all 50 whenever any neuron fires (the paper's co-active block).
Unused subcomponents are zero with CI 0. `clip(k|h|, 0, 1)` is written in the `mlp` CI form
(4 GELU units, within 4 x 0.17 / 64 = 0.011 of it). Both decompositions compute the target exactly
with every mask at 1; they differ only in where CI is non-zero, so the comparison is the minimality
cost of each against the reconstruction error that partial masks cause.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

SHARP = 64.0  # GELU(s y)/s is ReLU(y) to within 0.17/s (the largest gap, near y = -0.75/s)


def clip_abs_gate(C: int, active: np.ndarray, k: float, H: int, dtype=jnp.float32):
    """`mlp` CI weights giving z_c ~ clip(k |h_c|, 0, 1) (within 4 x 0.17 / SHARP) on `active`
    subcomponents and z_c = -1 elsewhere.

    z = (1/s) [GELU(s k h) - GELU(s k h - s) + GELU(-s k h) - GELU(-s k h - s)], s = SHARP.
    """
    from spdjax.ci import CIParams

    if H < 4:
        raise ValueError(f"the hand-built gate needs >= 4 hidden units, got {H}")
    w1, b1, w2 = np.zeros((C, 1, H)), np.zeros((C, H)), np.zeros((C, H, 1))
    b2 = np.full((C, 1), -1.0)
    a = np.flatnonzero(active)
    w1[a, 0, :4] = SHARP * k * np.array([1.0, 1.0, -1.0, -1.0])
    b1[a, :4] = SHARP * np.array([0.0, -1.0, 0.0, -1.0])
    w2[a, :4, 0] = np.array([1.0, -1.0, 1.0, -1.0]) / SHARP
    b2[a] = 0.0
    return CIParams(tuple(jnp.asarray(w, dtype) for w in (w1, w2)), tuple(jnp.asarray(b, dtype) for b in (b1, b2)), "mlp")


def build_params(target, weights, basis: str, k: float, H: int, seed: int = 0):
    from spdjax.components import Components
    from spdjax.decomposition import SPDParams

    W_E = np.asarray(weights["W_E"], np.float64)
    W_in, W_out = (np.asarray(weights[n][0], np.float64) for n in ("W_in", "W_out"))
    n_f, d_mlp = W_E.shape[0], W_in.shape[1]
    site_in = next(s for s in target.sites if s.name.endswith("mlp_in"))
    site_out = next(s for s in target.sites if s.name.endswith("mlp_out"))
    C_in, C_out = site_in.C, site_out.C
    if C_in < n_f or C_out < d_mlp:
        raise ValueError(f"need C >= {n_f} on mlp_in and >= {d_mlp} on mlp_out, got {C_in}, {C_out}")

    V_in = np.zeros((W_E.shape[1], C_in))
    V_in[:, :n_f] = W_E.T @ np.linalg.inv(W_E @ W_E.T)
    U_in = np.zeros((C_in, d_mlp))
    U_in[:n_f] = W_E @ W_in
    if basis == "neuron":
        Q = np.eye(d_mlp)
    elif basis == "dense":
        Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d_mlp, d_mlp)))
    else:
        raise ValueError(f"basis must be 'neuron' or 'dense', got {basis!r}")
    V_out = np.zeros((d_mlp, C_out))
    V_out[:, :d_mlp] = Q
    U_out = np.zeros((C_out, W_out.shape[1]))
    U_out[:d_mlp] = Q.T @ W_out
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    comps = {site_in.name: Components(V=f32(V_in), U=f32(U_in)), site_out.name: Components(V=f32(V_out), U=f32(U_out))}
    ci = {
        site_in.name: clip_abs_gate(C_in, np.arange(C_in) < n_f, k, H),
        site_out.name: clip_abs_gate(C_out, np.arange(C_out) < d_mlp, k, H),
    }
    return SPDParams(comps, ci)


def evaluate(cfg_path: str, n_batches: int, k: float, cache_dir: str) -> dict[str, dict[str, float]]:
    import experiments
    from experiments.resid_mlp.train_target import ResidMLPTargetConfig, load_or_train
    from spdjax.config import load_config_file, parse
    from spdjax.losses import loss_fn

    rc = parse(load_config_file(cfg_path))
    tcfg = ResidMLPTargetConfig.from_section(rc.target)
    if tcfg.n_layers != 1:
        raise ValueError("w_out_basis: 1-layer ResidMLP configs only")
    exp = experiments.build(rc, cache_dir)
    weights, _ = load_or_train(tcfg, cache_dir)  # a cache hit: build() trained or loaded it; W_E is no site
    loss_cfg = rc.loss
    f = jax.jit(lambda p, b, key: loss_fn(p, exp.target, b, key, loss_cfg)[1])
    results = {}
    for basis in ("neuron", "dense"):
        params = build_params(exp.target, weights, basis, k, rc.ci_hidden[0])
        acc: dict[str, list[float]] = {}
        for i in range(n_batches):
            batch = exp.batch_fn(jax.random.key(10_000 + i))
            m = jax.device_get(f(params, batch, jax.random.key(20_000 + i)))
            for name, v in m.items():
                acc.setdefault(name, []).append(float(v))
        results[basis] = {n: float(np.mean(v)) for n, v in acc.items()}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/resid_mlp.py")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--k", type=float, default=20.0, help="CI = clip(k |h|, 0, 1): 1 above |h| = 1/k")
    ap.add_argument("--cache_dir", default=".cache/targets")
    args = ap.parse_args()
    res = evaluate(args.config, args.batches, args.k, args.cache_dir)
    names = sorted(set(res["neuron"]) | set(res["dense"]))
    print(f"W_out basis comparison, {args.config}, k={args.k}, {args.batches} batches (mean per batch)")
    print(f"{'metric':40s} {'neuron':>14s} {'dense':>14s}")
    for n in names:
        print(f"{n:40s} {res['neuron'].get(n, float('nan')):14.6g} {res['dense'].get(n, float('nan')):14.6g}")


if __name__ == "__main__":
    main()
