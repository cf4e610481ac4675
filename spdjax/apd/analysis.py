"""Ground-truth analysis of an APD decomposition (flat summary dict) and its figures.

- `mmcs/<site>`, `ml2r/<site>` for every primary linear site, on the columns `P_{c,l}[j, :]` of the
  dense component kernels (`mmcs`, `ml2r`: on `linear1` when present, else the first linear site);
- `n_alive`: components alive by activity, the APD counterpart of SPD's causal-importance count
  (APD has no CI): components that the run's own top-k selection (`apd.topk`, batch or per-sample as in
  training) keeps on at least one position of the held-out batch, i.e. that batch's `topk/n_used`.
  Without top-k (`apd.topk=None`, L_p sparsity runs) a component counts where its attribution is at
  least `ATTR_ALIVE_SHARE` (0.1) of the position's largest attribution. A component spans every site
  and is selected for all of them at once, so there is no per-site activity count;
- `n_alive_norm`: components with `sum_l sum_j ||P_{c,l}[j, :]|| > 0.017` (the SPD reference's
  liveness score summed over sites; secondary: a component that keeps a small norm but is never
  selected counts here, not in `n_alive`); `n_alive_norm/<site>` per site (the figures show these);
- on one-hot inputs `x = 0.75 e_i` (float-vector targets): attributions `(n_features, C)`,
  `n_features_with_own_component` (feature i's largest-attribution component is no other feature's
  largest and holds >= half of i's attribution), the misses split into `n_shared_components` (largest
  for several features) and `n_split_features` (largest is their own but holds < half),
  `n_distinct_best`, `onehot_topk_recon_mse` (per-sample top-1 on e_i); the per-feature detail goes
  to `ownership.json` in the workdir;
- on a held-out batch: every loss term, `topk/l0`, `topk/n_used`;
- `n_apd_params` (trainable), `n_target_weights` (N).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spdjax import metrics
from spdjax.apd.attributions import attributions
from spdjax.apd.components import APDParams, count_params, n_target_params, site_components
from spdjax.apd.forward import clean_forward, masked_forward
from spdjax.apd.losses import TERMS, APDConfig, apd_loss_fn
from spdjax.apd.topk import sample_topk_mask
from spdjax.targets.base import Target

ONE_HOT_VALUE = 0.75
ALIVE_THRESHOLD = 0.017  # n_alive_norm
ATTR_ALIVE_SHARE = 0.1  # n_alive without top-k: attribution >= this share of the position's largest
OWN_SHARE = 0.5


def _one_hot_fn(params, target, x, config: APDConfig):
    out, inputs = clean_forward(target, x)
    attr = attributions(config.attribution, params, target, x, inputs)
    mask = sample_topk_mask(attr, 1).astype(out.dtype)
    pred = masked_forward(params, target, x, mask)
    return attr, jnp.mean((pred - out) ** 2, axis=-1)


_one_hot_jit = jax.jit(_one_hot_fn)


def _eval_fn(params, target, batch, config: APDConfig):
    return apd_loss_fn(params, target, batch, None, config, TERMS)[1]


_eval_jit = jax.jit(_eval_fn)


def _attr_alive_fn(params, target, batch, config: APDConfig, share: float):
    _, inputs = clean_forward(target, batch)
    attr = attributions(config.attribution, params, target, batch, inputs)
    attr = attr.reshape(-1, attr.shape[-1])
    top = jnp.max(attr, axis=-1, keepdims=True)
    return jnp.any((attr >= share * top) & (top > 0), axis=0)


_attr_alive_jit = jax.jit(_attr_alive_fn, static_argnames="share")


def n_alive_by_activity(params: APDParams, target: Target, config: APDConfig, batch, eval_metrics=None) -> int:
    """Components selected on at least one position of `batch` (see the module docstring): with top-k,
    `topk/n_used` of the batch's evaluation (`eval_metrics`, computed when not given); without, the
    components whose attribution reaches `ATTR_ALIVE_SHARE` of a position's largest."""
    if config.topk is None:
        return int(np.sum(np.asarray(_attr_alive_jit(params, target, batch, config, ATTR_ALIVE_SHARE))))
    if eval_metrics is None:
        eval_metrics = jax.device_get(_eval_jit(params, target, batch, config))
    return int(round(float(eval_metrics["topk/n_used"])))


def ownership(attr, share: float = OWN_SHARE) -> dict:
    """Which component each feature relies on, from one-hot attributions `attr: (n_features, C) >= 0`.

    `best[i]` is feature i's largest-attribution component and `frac[i]` its share of i's total
    attribution (0 when the total is 0). `own`: features whose best is no other feature's best and
    holds >= `share`; `shared`: `{component: features}` for components that are several features'
    best; `split`: features whose best is theirs alone but holds < `share`. own + split + the
    features in shared partition all features.
    """
    attr = np.asarray(attr, np.float64)
    best = np.argmax(attr, axis=1)
    counts = np.bincount(best, minlength=attr.shape[1])
    tot = attr.sum(axis=1)
    frac = np.divide(attr[np.arange(len(best)), best], tot, out=np.zeros_like(tot), where=tot > 0)
    alone = counts[best] == 1
    return {
        "best": best.tolist(),
        "frac": frac.tolist(),
        "own": np.flatnonzero(alone & (frac >= share)).tolist(),
        "split": np.flatnonzero(alone & (frac < share)).tolist(),
        "shared": {int(c): np.flatnonzero(best == c).tolist() for c in np.flatnonzero(counts > 1)},
    }


def n_features_with_own_component(attr, share: float = OWN_SHARE) -> int:
    return len(ownership(attr, share)["own"])


def dense_kernels(params: APDParams, target: Target) -> dict[str, np.ndarray]:
    """`{primary site: (C, d_in, d_out)}` component kernels."""
    return {s.name: np.asarray(site_components(params, s).kernels(), np.float64) for s in target.primary_sites}


def analyze(
    params: APDParams, target: Target, config: APDConfig, n_features: int | None, eval_batch, workdir: Path | None
) -> dict:
    out: dict = {}
    kernels = {k: np.asarray(v, np.float64) for k, v in target.kernels().items()}
    dense = dense_kernels(params, target)
    liveness = 0.0
    for s in target.primary_sites:
        if s.kind == "linear":
            out[f"mmcs/{s.name}"], out[f"ml2r/{s.name}"] = metrics.mmcs_ml2r_dense(kernels[s.name], dense[s.name])
        norms = metrics.dense_component_norms(dense[s.name])
        out[f"n_alive_norm/{s.name}"] = int(np.sum(norms > ALIVE_THRESHOLD))
        liveness = liveness + norms
    out["n_alive_norm"] = int(np.sum(liveness > ALIVE_THRESHOLD))
    main = "linear1" if "mmcs/linear1" in out else next(
        (s.name for s in target.primary_sites if f"mmcs/{s.name}" in out), None
    )
    if main is not None:
        out["mmcs"], out["ml2r"] = out[f"mmcs/{main}"], out[f"ml2r/{main}"]
    out["n_apd_params"] = count_params(params)
    out["n_target_weights"] = n_target_params(target)
    ev = jax.device_get(_eval_jit(params, target, eval_batch, config))
    out.update({k: float(v) for k, v in ev.items()})
    out["n_alive"] = n_alive_by_activity(params, target, config, eval_batch, ev)
    attr = None
    if n_features:
        x = ONE_HOT_VALUE * jnp.eye(n_features, dtype=jnp.float32)
        attr, err = (np.asarray(a) for a in _one_hot_jit(params, target, x, config))
        own = ownership(attr)
        out["n_features_with_own_component"] = len(own["own"])
        out["n_shared_components"] = len(own["shared"])
        out["n_split_features"] = len(own["split"])
        out["n_distinct_best"] = len(set(own["best"]))
        out["onehot_top1_recon_mse/mean"] = float(err.mean())
        out["onehot_top1_recon_mse/max"] = float(err.max())
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        figures(kernels, dense, attr, liveness, Path(workdir), target)
        if attr is not None:
            (Path(workdir) / "ownership.json").write_text(json.dumps(own))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def order_components(dense_site: np.ndarray, alive: np.ndarray) -> list[int]:
    """Alive components sorted by the column j they are largest on."""
    norms = np.linalg.norm(dense_site, axis=2)
    return sorted((int(c) for c in alive), key=lambda c: (int(np.argmax(norms[c])), c))


def plot_columns_2d(ax_row, kernel: np.ndarray, comps: list[np.ndarray], titles: list[str]) -> None:
    """Target columns, then each component's columns, as arrows from the origin (d_out == 2)."""
    plt = _plt()
    lim = 1.1 * max(np.abs(kernel).max(), 1e-6)
    colors = plt.get_cmap("tab10" if kernel.shape[0] <= 10 else "viridis")(np.linspace(0, 1, max(kernel.shape[0], 2)))
    for ax, M, title in zip(ax_row, [kernel, *comps], ["target", *titles]):
        for j in range(M.shape[0]):
            ax.arrow(0, 0, M[j, 0], M[j, 1], color=colors[j % len(colors)], width=0.01 * lim,
                     length_includes_head=True)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)


def figures(kernels, dense, attr, liveness, workdir: Path, target: Target) -> None:
    plt = _plt()
    alive = np.flatnonzero(liveness > ALIVE_THRESHOLD)
    for s in target.primary_sites:
        K, P = kernels[s.name], dense[s.name]
        order = order_components(P, alive)[:63]
        if K.shape[1] == 2:
            n = 1 + len(order)
            fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.2), squeeze=False)
            plot_columns_2d(axes[0], K, [P[c] for c in order], [f"component {c}" for c in order])
            fig.suptitle(f"APD {s.name}: target columns vs {len(alive)} components alive by norm", fontsize=9)
            name = f"columns_{s.name}.png"
        else:
            norms = np.linalg.norm(P[order], axis=2).T if order else np.zeros((K.shape[0], 0))
            fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(order) + 2), max(3, 0.1 * K.shape[0] + 1)))
            im = ax.imshow(norms / np.maximum(np.linalg.norm(K, axis=1)[:, None], 1e-12), aspect="auto", cmap="viridis")
            fig.colorbar(im, ax=ax, label="||P_c[j]|| / ||W[j]||")
            ax.set_xlabel("component alive by norm (ordered by largest column)")
            ax.set_ylabel("column j (input dimension)")
            ax.set_title(f"APD {s.name}: column norms of {len(alive)} components alive by norm", fontsize=9)
            name = f"column_norms_{s.name}.png"
        fig.savefig(workdir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
    if attr is not None:
        a = attr / np.maximum(attr.max(axis=1, keepdims=True), 1e-30)
        order = np.argsort(np.argmax(a, axis=0) + 1e-3 * np.arange(a.shape[1]) + (a.max(axis=0) < 0.5) * a.shape[0], kind="stable")
        fig, ax = plt.subplots(figsize=(max(4, 0.06 * a.shape[1] + 2), max(3, 0.05 * a.shape[0] + 1.5)))
        im = ax.imshow(a[:, order], aspect="auto", cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, label="attribution / row max")
        ax.set_xlabel("component (sorted)")
        ax.set_ylabel(f"one-hot input {ONE_HOT_VALUE} e_i")
        ax.set_title("APD attributions on one-hot inputs", fontsize=9)
        fig.savefig(workdir / "attributions_one_hot.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
