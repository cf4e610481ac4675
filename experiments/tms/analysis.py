"""Ground-truth analysis of a TMS decomposition: metrics (flat summary dict) and figures (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np

from spdjax import metrics, plots
from spdjax.components import site_components
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig
from spdjax.targets.base import Target

ONE_HOT_VALUE = 0.75
ALIVE_THRESHOLD = metrics.NORM_ALIVE_THRESHOLD  # the secondary norm count (n_alive_norm) and the figures
CI_ALIVE_THRESHOLD = metrics.CI_ALIVE_THRESHOLD  # n_alive: CI > 0.1 on some held-out input (toy_models.md)
CI_TOL = 0.1
MAX_PANELS = 63  # subcomponents drawn per site


def ci_patterns(target: Target) -> dict[str, tuple[str, int | None]]:
    """Expected CI pattern per site on one-hot inputs: linear sites one subcomponent per feature
    (`identity`); inserted identities a dense block of d (= n_hidden) subcomponents (`dense`, k=d)."""
    return {
        s.name: ("dense", s.d_in) if s.kind == "identity" else ("identity", None) for s in target.sites
    }


def make_analyze(
    *,
    n_features: int,
    eval_batch_fn: Callable,
    seed: int,
    info: dict,
) -> Callable[[SPDParams, Target, Path | None, LossConfig], dict]:
    """`analyze(params, target, workdir, loss) -> flat summary dict`, writing figures into `workdir`
    (None: none); the CI sigmoid and the CI-L0 threshold come from `loss` (the run's `LossConfig`).

    Keys: `mmcs`, `ml2r` (on W, the `linear1` site; also `mmcs/<site>`, `ml2r/<site>` for every primary
    linear site); `n_alive/<site>` for every site (tied and identity sites included): subcomponents whose
    CI exceeds 0.1 on at least one input of the held-out eval batch (toy_models.md), and `n_alive` their
    sum (a tied pair counts its shared subcomponents once per site); `n_alive_norm/<site>` for every primary
    site and `n_alive_norm`: the secondary norm count (liveness score > 0.017, `metrics.n_alive`);
    `n_alive_gap/<site>` and `liveness_gap_ratio/<site>` (threshold-free: the count above the widest gap in
    the sorted liveness scores, and that gap's ratio; see `metrics.liveness_gap`); `ci_l0/<site>` and
    `n_ci_active/<site>` (CI above the run's CI-L0 threshold) on the held-out eval batch,
    `identity_ci_error/<site>` and `identity_ci_error` (total), `target_seed`, `target_n_represented`.
    The figures show the subcomponents alive by norm.
    """

    def analyze(params: SPDParams, target: Target, workdir: Path | None, loss: LossConfig) -> dict:
        sigmoid, ci_l0_threshold = loss.sigmoid, loss.ci_l0_threshold
        out: dict = {}
        kernels = {k: np.asarray(v) for k, v in target.kernels().items()}
        for s in target.primary_sites:
            comps = params.components[s.name]
            if s.kind == "linear":
                mm, ml = metrics.mmcs_ml2r(kernels[s.name], comps)
                out[f"mmcs/{s.name}"], out[f"ml2r/{s.name}"] = mm, ml
            out[f"n_alive_gap/{s.name}"], out[f"liveness_gap_ratio/{s.name}"] = metrics.liveness_gap(comps)
        main = "linear1" if "linear1" in params.components else next(
            (s.name for s in target.primary_sites if s.kind == "linear"), None
        )
        if main is not None and f"mmcs/{main}" in out:
            out["mmcs"], out["ml2r"] = out[f"mmcs/{main}"], out[f"ml2r/{main}"]

        batch = eval_batch_fn(jax.random.fold_in(jax.random.PRNGKey(seed), 0x7E57))
        ci_eval = metrics.batch_ci(params, target, batch, sigmoid)
        out.update(metrics.alive_counts(
            params.components, target.sites, ci_eval, CI_ALIVE_THRESHOLD, ALIVE_THRESHOLD
        ))
        for name, g in ci_eval.items():
            out[f"ci_l0/{name}"] = metrics.ci_l0(g, ci_l0_threshold)
            out[f"n_ci_active/{name}"] = metrics.n_ci_active(g, ci_l0_threshold)

        ci = metrics.one_hot_ci(params, target, n_features, ONE_HOT_VALUE, sigmoid)
        patterns = ci_patterns(target)
        total = 0
        for name, (kind, k) in patterns.items():
            n_in, C = ci[name].shape
            if (kind == "identity" and C < n_in) or (kind == "dense" and C < k):
                continue  # too few subcomponents for the pattern: no score for this site
            e = metrics.identity_ci_error(ci[name], kind, k, CI_TOL)
            out[f"identity_ci_error/{name}"] = e
            total += e
        out["identity_ci_error"] = total
        out["target_seed"] = int(info["seed_used"])
        out["target_n_represented"] = int(info["n_represented"])

        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            _figures(params, target, kernels, ci, patterns, Path(workdir))
        return out

    return analyze


def _figures(params, target, kernels, ci, patterns, workdir: Path) -> None:
    for s in target.primary_sites:
        comps = site_components(params.components, s)
        alive = metrics.alive_indices(comps, ALIVE_THRESHOLD)  # largest first
        shown = alive[:MAX_PANELS]
        order = plots.order_by_column(comps, shown)
        title = f"{s.name}: target vs {len(alive)} subcomponents alive by norm (> {ALIVE_THRESHOLD})"
        if len(shown) < len(alive):
            title += f" (largest {len(shown)} shown)"
        if kernels[s.name].shape[1] == 2:
            plots.plot_columns_2d(kernels[s.name], comps, order, workdir / f"columns_{s.name}.png", title)
        else:
            plots.plot_subcomponent_matrices(
                kernels[s.name], comps, order, workdir / f"subcomponents_{s.name}.png", title,
                max_panels=MAX_PANELS + 1,
            )
    plots.plot_ci_heatmaps(
        ci, workdir / "ci_one_hot.png", {n: k for n, (k, _) in patterns.items()},
        title=f"CI on one-hot inputs x = {ONE_HOT_VALUE} e_i",
    )
