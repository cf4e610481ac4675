"""Ground-truth analysis of a ResidMLP decomposition: metrics (flat summary dict) and figures (PNG).

Expected solution (toy_models.md): every feature i has its own W_in subcomponent (CI ~1 on 0.75 e_i
and ~0 elsewhere), spread over the layers in multi-layer models; the W_out subcomponents of each layer
form one dense block of d_mlp subcomponents active on every feature; the neuron contributions of each
feature's W_in subcomponent match the target's.

A W_out block can instead come out in the neuron basis (one rank-one subcomponent per ReLU neuron,
active only when its neuron fires): as faithful, and cheaper under the minimality term, but not the
dense pattern IdentityCIError scores. `w_out_neuron_basis` measures how close a W_out site is to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.resid_mlp.model import neuron_contributions
from spdjax import metrics, plots
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig, clean_forward
from spdjax.targets.base import Target

ONE_HOT_VALUE = 0.75
ALIVE_THRESHOLD = metrics.NORM_ALIVE_THRESHOLD  # the secondary norm count (n_alive_norm)
CI_ALIVE_THRESHOLD = metrics.CI_ALIVE_THRESHOLD  # n_alive: CI > 0.1 on some held-out input (toy_models.md)
CI_TOL = 0.1
OWN_W_IN_CI = 0.9  # n_features_with_own_w_in: the feature's best W_in subcomponent has CI >= this
NEURON_ALIGNED = 0.95  # a W_out subcomponent is neuron-aligned when max_j |V_jc| / ||V_c|| >= this
W_IN_GROUP = "layers.*.mlp_in"  # key of the concatenated W_in sites in multi-layer models


def w_in_ci(ci: dict[str, np.ndarray], w_in_sites: list[str]) -> tuple[str, np.ndarray]:
    """`(key, (n_inputs, sum C))`: the CI of all W_in sites side by side (one site: its own name)."""
    key = w_in_sites[0] if len(w_in_sites) == 1 else W_IN_GROUP
    return key, np.concatenate([np.asarray(ci[n]) for n in w_in_sites], axis=1)


def own_subcomponents(ci, threshold: float = OWN_W_IN_CI) -> np.ndarray:
    """`(n_features,)`: the column c_i = argmax_c ci[i, c] where it has CI >= threshold and is the best
    subcomponent of no other feature (feature i owns it), else -1. ci: `(n_features, C)` on one-hot inputs."""
    ci = np.asarray(ci)
    best = np.argmax(ci, axis=1)
    counts = np.bincount(best, minlength=ci.shape[1])
    own = (ci[np.arange(ci.shape[0]), best] >= threshold) & (counts[best] == 1)
    return np.where(own, best, -1)


def n_features_with_own_subcomponent(ci, threshold: float = OWN_W_IN_CI) -> int:
    """Number of features that own a subcomponent (see `own_subcomponents`)."""
    return int(np.sum(own_subcomponents(ci, threshold) >= 0))


def w_out_neuron_basis(V, ci, hidden, k: int, tol: float = CI_TOL) -> dict[str, int]:
    """How far a W_out site is in the neuron basis, on one-hot inputs.

    V `(d_mlp, C)`: the site's V (its input is the hidden activation); ci `(n_f, C)`: CI on the one-hot
    inputs; hidden `(n_f, d_mlp)`: the target's hidden activations on the same inputs. Among the `k`
    subcomponents with the largest CI mass: `aligned` (max_j |V_jc| / ||V_c|| >= NEURON_ALIGNED),
    `neurons` (distinct neurons argmax_j |V_jc| of the aligned ones), and over the (feature, aligned
    subcomponent) pairs `ci_on_silent` (CI > tol while the neuron is off, h = 0: an error in this basis)
    and `ci_on_firing` (CI > tol while it fires), `firing` (pairs with h > 0).
    """
    V, ci, hidden = (np.asarray(a, np.float64) for a in (V, ci, hidden))
    top = np.argsort(-ci.sum(0), kind="stable")[:k]
    Vt = V[:, top]
    norms = np.linalg.norm(Vt, axis=0)
    share = np.divide(np.abs(Vt).max(0), norms, out=np.zeros_like(norms), where=norms > 0)
    aligned = share >= NEURON_ALIGNED
    neuron = np.abs(Vt).argmax(0)[aligned]
    fires = hidden[:, neuron] > 0  # (n_f, n_aligned)
    g = ci[:, top[aligned]] > tol
    return {"aligned": int(aligned.sum()), "neurons": int(len(set(neuron.tolist()))),
            "ci_on_silent": int((g & ~fires).sum()), "ci_on_firing": int((g & fires).sum()),
            "firing": int(fires.sum())}


def spd_neuron_contributions(W_E, V_in, U_in, W_out_kernel) -> np.ndarray:
    """Per feature i, the neuron contributions `(n_features, d_mlp)` of the W_in subcomponent m with the
    largest total contribution (in magnitude): `(W_U[i] W_out_spd)_n * (U_m V_m W_E[i]^T)_n` (toy_models.md).

    Kernel layout: V_in `(d_embed, C)`, U_in `(C, d_mlp)`, W_out_kernel `(d_mlp, d_embed)`.
    """
    W_E = np.asarray(W_E, np.float64)
    V_in, U_in = np.asarray(V_in, np.float64), np.asarray(U_in, np.float64)
    out_side = W_E @ np.asarray(W_out_kernel, np.float64).T  # (n_f, d_mlp): W_U[i] W_out
    h = W_E @ V_in  # (n_f, C): inner activation of subcomponent m on e_i
    total = h * (out_side @ U_in.T)  # (n_f, C): sum_n of the contributions
    best = np.argmax(np.abs(total), axis=1)
    return out_side * h[np.arange(len(best)), best][:, None] * U_in[best]


def _rel_err(target, spd) -> float:
    """||spd - target|| / ||target|| (Frobenius; 0: on the diagonal of the scatter)."""
    den = np.linalg.norm(target)
    return float(np.linalg.norm(spd - target) / den) if den > 0 else float("nan")


def layer_output_shares(W_E, W_in, W_out, value: float = ONE_HOT_VALUE) -> np.ndarray:
    """`(n_features, L)`: the share of feature i's own output (y_i on the one-hot input value e_i, read
    out with W_U = W_E^T) that each layer's MLP writes, |c_il| / sum_l |c_il|; 0 where nothing is written.

    Shows whether the target computes a feature in one layer or spreads it over several (then a
    decomposition into per-layer rank-one subcomponents needs one W_in subcomponent per feature per layer).
    W_E `(n_f, d)`, W_in `(L, d, d_mlp)`, W_out `(L, d_mlp, d)`.
    """
    W_E, W_in, W_out = (np.asarray(a, np.float64) for a in (W_E, W_in, W_out))
    r = value * W_E
    own = []
    for l in range(W_in.shape[0]):
        d = np.maximum(r @ W_in[l], 0.0) @ W_out[l]
        own.append(np.einsum("id,id->i", d, W_E))
        r = r + d
    c = np.abs(np.stack(own, axis=1))
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def expected_ci_l0(n_features: int, d_mlp: int, feature_prob: float) -> dict[str, float]:
    """CI-L0 of a perfect decomposition, from the data (toy_models.md): the W_in sites together select
    one subcomponent per active feature, `n_f p`; each layer's W_out block of `d_mlp` subcomponents is
    active whenever any feature is, `d_mlp (1 - (1 - p)^n_f)`."""
    return {"w_in_total": n_features * feature_prob, "w_out_per_layer": d_mlp * (1 - (1 - feature_prob) ** n_features)}


def make_analyze(
    *,
    n_features: int,
    d_mlp: int,
    feature_prob: float,
    weights: dict,
    eval_batch_fn: Callable,
    seed: int,
    info: dict,
) -> Callable[[SPDParams, Target, Path | None, LossConfig], dict]:
    """`analyze(params, target, workdir, loss) -> flat summary dict`, writing figures into `workdir`
    (None: none); the CI sigmoid and the CI-L0 threshold come from `loss` (the run's `LossConfig`).

    Keys: `ci_l0/<site>` and `n_ci_active/<site>` (held-out batch, the run's CI-L0 threshold);
    `n_alive/<site>` for every site (subcomponents with CI > 0.1 on at least one input of the held-out
    batch, toy_models.md) and `n_alive` (their sum); `n_alive_norm/<site>` and `n_alive_norm` (the
    secondary norm count, liveness score > 0.017; see `metrics.alive_counts`); IdentityCIError on one-hot
    inputs 0.75 e_i: `identity_ci_error/<W_in site>` (one layer) or `identity_ci_error/layers.*.mlp_in`
    (all W_in sites' CI columns concatenated; identity pattern), `identity_ci_error/<W_out site>` (dense,
    k = d_mlp), `identity_ci_error` (their sum, tol 0.1), `identity_ci_error_tol0.2`;
    `n_features_with_own_w_in` (and, with several layers, `n_features_with_own_w_in/<W_in site>`: in which
    layer the owned subcomponents are); with several layers also `identity_ci_error_per_layer/<W_in site>`
    (each W_in site alone, identity pattern; not in the total) and, from the target's weights,
    `target_features_in_one_layer` (>= 90% of the feature's own output from one layer) and
    `target_features_split` (>= 20% from each of two or more layers; see `layer_output_shares`);
    `neuron_contrib_rel_err/layers.<l>` (||SPD - target|| / ||target|| of
    the neuron contributions);
    `ci_l0/layers.*.mlp_in` (sum over the W_in sites) and `ci_l0_expected/<site>` next to the measured
    values (W_out sites and the W_in total); `feature_recon_mse/mean`, `/max` (per feature i, the MSE of
    the CI-masked model vs the target on 0.75 e_i; figure `feature_recon_error.png`);
    `w_out_neuron_basis/<W_out site>/{aligned,neurons,ci_on_silent,ci_on_firing,firing}` (see
    `w_out_neuron_basis`, k = d_mlp) and `w_out_firing_l0/<W_out site>` (held-out batch: mean number of
    the target's neurons with h > 0, the CI-L0 of a W_out block in the neuron basis); `target_seed`,
    `target_final_loss`. `weights`: the target's `W_E`, `W_in`, `W_out` (stacked layout).
    """
    weights = {k: np.asarray(weights[k], np.float64) for k in ("W_E", "W_in", "W_out")}

    def analyze(params: SPDParams, target: Target, workdir: Path | None, loss: LossConfig) -> dict:
        sigmoid, ci_l0_threshold = loss.sigmoid, loss.ci_l0_threshold
        out: dict = {}
        names = [s.name for s in target.sites]
        w_in = [n for n in names if n.endswith(".mlp_in")]
        w_out = [n for n in names if n.endswith(".mlp_out")]
        batch = eval_batch_fn(jax.random.fold_in(jax.random.PRNGKey(seed), 0x7E57))
        ci_eval = metrics.batch_ci(params, target, batch, sigmoid)
        out.update(metrics.alive_counts(
            params.components, target.sites, ci_eval, CI_ALIVE_THRESHOLD, ALIVE_THRESHOLD
        ))
        for name, g in ci_eval.items():
            out[f"ci_l0/{name}"] = metrics.ci_l0(g, ci_l0_threshold)
            out[f"n_ci_active/{name}"] = metrics.n_ci_active(g, ci_l0_threshold)
        expected = expected_ci_l0(n_features, d_mlp, feature_prob)
        if w_out:  # the target's hidden activations (W_out inputs) on the batch and on the one-hot inputs
            _, batch_inputs = clean_forward(target, batch)
            _, hidden = clean_forward(target, jnp.eye(n_features, dtype=jnp.float32) * ONE_HOT_VALUE)
        for name in w_out:
            out[f"ci_l0_expected/{name}"] = expected["w_out_per_layer"]
            h = np.asarray(batch_inputs[name])
            out[f"w_out_firing_l0/{name}"] = float((h > 0).reshape(-1, h.shape[-1]).sum(-1).mean())
        if w_in:
            total_key = w_in[0] if len(w_in) == 1 else W_IN_GROUP
            if len(w_in) > 1:
                out[f"ci_l0/{W_IN_GROUP}"] = sum(out[f"ci_l0/{n}"] for n in w_in)
            out[f"ci_l0_expected/{total_key}"] = expected["w_in_total"]
        feature_err = metrics.one_hot_recon_error(params, target, n_features, ONE_HOT_VALUE, sigmoid)
        out["feature_recon_mse/mean"] = float(feature_err.mean())
        out["feature_recon_mse/max"] = float(feature_err.max())

        ci = metrics.one_hot_ci(params, target, n_features, ONE_HOT_VALUE, sigmoid)
        panels, patterns, scored = {}, {}, []  # scored: (key, ci, kind, k)
        if w_in:
            key, g = w_in_ci(ci, w_in)
            panels[key], patterns[key] = g, "identity"
            if g.shape[1] >= n_features:
                scored.append((key, g, "identity", None))
            owned = own_subcomponents(g)
            out["n_features_with_own_w_in"] = int(np.sum(owned >= 0))
        if len(w_in) > 1:  # per layer: owned subcomponents, each W_in site alone (not in the total); the target's split
            ends = np.cumsum([np.asarray(ci[n]).shape[1] for n in w_in])
            layer_of = np.searchsorted(ends, owned[owned >= 0], side="right")
            for i, n in enumerate(w_in):
                out[f"n_features_with_own_w_in/{n}"] = int(np.sum(layer_of == i))
                if np.asarray(ci[n]).shape[1] >= n_features:
                    out[f"identity_ci_error_per_layer/{n}"] = metrics.identity_ci_error(ci[n], "identity", None, CI_TOL)
            shares = layer_output_shares(weights["W_E"], weights["W_in"], weights["W_out"])
            out["target_features_in_one_layer"] = int(np.sum(shares.max(axis=1) >= 0.9))
            out["target_features_split"] = int(np.sum(np.sum(shares >= 0.2, axis=1) >= 2))
        for name in w_out:
            panels[name], patterns[name] = ci[name], "dense"
            basis = w_out_neuron_basis(params.components[name].V, ci[name], hidden[name], d_mlp)
            out.update({f"w_out_neuron_basis/{name}/{k}": v for k, v in basis.items()})
            if ci[name].shape[1] >= d_mlp:
                scored.append((name, ci[name], "dense", d_mlp))
        for tol, suffix in ((CI_TOL, ""), (0.2, "_tol0.2")):
            total = 0
            for key, g, kind, k in scored:
                e = metrics.identity_ci_error(g, kind, k, tol)
                if not suffix:
                    out[f"identity_ci_error/{key}"] = e
                total += e
            out[f"identity_ci_error{suffix}"] = total

        contrib = _contributions(params, weights, w_in)
        for layer, (t, s) in contrib.items():
            out[f"neuron_contrib_rel_err/{layer}"] = _rel_err(t, s)
        out["target_seed"] = int(info.get("seed_used", -1))
        out["target_final_loss"] = float(info.get("final_loss", float("nan")))

        if workdir is not None:
            workdir = Path(workdir)
            plots.plot_ci_heatmaps(
                panels, workdir / "ci_one_hot.png", patterns, max_columns=2 * n_features,
                title=f"CI on one-hot inputs x = {ONE_HOT_VALUE} e_i",
            )
            plots.plot_bars(
                feature_err, workdir / "feature_recon_error.png", xlabel="feature i",
                ylabel="MSE vs target", title=f"CI-masked model on x = {ONE_HOT_VALUE} e_i, per feature",
            )
            if contrib:
                plots.plot_scatter_panels(
                    {f"{k} (rel. error {out['neuron_contrib_rel_err/' + k]:.3f})": v
                     for k, v in contrib.items()},
                    workdir / "neuron_contributions.png", xlabel="target", ylabel="SPD subcomponent",
                    title="neuron contributions per feature (each feature's best W_in subcomponent)",
                )
        return out

    return analyze


def _contributions(params, weights, w_in) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{layers.<l>: (target (n_f, d_mlp), SPD (n_f, d_mlp))}` for every layer whose W_in is a site.

    The SPD side uses the layer's W_out subcomponents summed (the target's W_out if it is no site)."""
    W_E = weights["W_E"]
    out = {}
    for name in w_in:
        layer = name[: -len(".mlp_in")]
        out_name = layer + ".mlp_out"
        l = int(layer.rsplit(".", 1)[1])
        K_in, K_out = weights["W_in"][l], weights["W_out"][l]
        if out_name in params.components:
            c = params.components[out_name]
            spd_out = np.asarray(c.V, np.float64) @ np.asarray(c.U, np.float64)
        else:
            spd_out = K_out
        c = params.components[name]
        out[layer] = (
            neuron_contributions(W_E, K_in, K_out),
            spd_neuron_contributions(W_E, c.V, c.U, spd_out),
        )
    return out
