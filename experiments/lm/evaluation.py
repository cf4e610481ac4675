"""What the field reports for a decomposed language model (transformers.md; the reference's
`CEandKLLosses`), on held-out windows, every position counted.

Maskings (all sites at once): `unmasked` (masks 1), `ci` (masks = CI), `rounded` (1 where CI > 0),
`stochastic` (g + (1 - g) r, r ~ U(0, 1)), `random` (masks ~ U(0, 1)), `zero` (masks 0). For each:
`ce/<masking>` (next-token CE, nats), `kl/<masking>` (KL(target || masked) of the next-token
distributions) and `ce_unrecovered/<masking>` = (ce - ce_target) / (ce_zero - ce_target). Also
`target_ce`, `ci_l0/<site>` and `ci_l0_layer/<l>` (per token, CI above the run's threshold),
`n_alive_mean_ci/<site>` (mean CI over every held-out token, `n_mean_ci_tokens` of them, above 1e-6),
`n_alive_max_ci/<site>` (CI above the threshold on at least one of those tokens), their totals
`n_alive_{mean,max}_ci`, and the figure `ci_spectrum.png` (each site's mean CI per subcomponent, sorted).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.lm.model import next_token_ce
from spdjax import metrics
from spdjax.losses import clean_forward, compute_ci, masked_forward
from spdjax.masks import SiteMask, sample_r, stochastic_mask

MASKINGS = ("unmasked", "ci", "rounded", "stochastic", "random", "zero")
MEAN_CI_ALIVE = 1e-6


def next_token_kl(target_logits, logits) -> jax.Array:
    """Mean over positions of KL(softmax(target) || softmax(logits)), the last position excluded (it
    predicts past the window, as in the CE)."""
    p = jax.nn.log_softmax(target_logits[:, :-1].astype(jnp.float32), -1)
    q = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))


def make_analyze(held: dict, seed: int, all_held: np.ndarray | None = None, chunk_tokens: int = 32_768):
    """`analyze(params, target, workdir, loss) -> flat summary dict` (module docstring). `held`: the eval
    batch; `all_held`: every held-out window `(n, T)` for the mean CI (default: the eval batch), read in
    chunks of about `chunk_tokens` tokens."""
    tokens = jnp.asarray(held["tokens"])
    all_held = np.asarray(held["tokens"]) if all_held is None else all_held
    chunk = max(1, chunk_tokens // all_held.shape[1])

    @functools.partial(jax.jit, static_argnames="sigmoid")
    def ci_stats(params, target, batch_tokens, sigmoid):
        """Per site: the sum and the max of each subcomponent's CI over the tokens of `batch_tokens`."""
        _, inputs = clean_forward(target, {"tokens": batch_tokens})
        ci = compute_ci(params, target, inputs, sigmoid).lower
        flat = {n: g.reshape(-1, g.shape[-1]).astype(jnp.float32) for n, g in ci.items()}
        return {n: (jnp.sum(g, 0), jnp.max(g, 0)) for n, g in flat.items()}

    @jax.jit
    def evaluate(params, target, masks, target_logits):
        logits = masked_forward(params, target, {"tokens": tokens}, masks)
        return {"ce": next_token_ce(logits, tokens), "kl": next_token_kl(target_logits, logits)}

    target_forward = jax.jit(lambda params, target: masked_forward(params, target, {"tokens": tokens}, {}))

    def ci_over_held(params, target, sigmoid: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        """`(mean CI, max CI, token count)` per site over every window of `all_held`."""
        parts = [jax.device_get(ci_stats(params, target, jnp.asarray(all_held[i : i + chunk]), sigmoid))
                 for i in range(0, len(all_held), chunk)]
        means = {k: sum(p[k][0] for p in parts) / all_held.size for k in parts[0]}
        maxs = {k: np.max([p[k][1] for p in parts], 0) for k in parts[0]}
        return means, maxs, all_held.size

    def analyze(params, target, workdir: Path | None, loss) -> dict:
        ci = {n: jnp.asarray(g) for n, g in metrics.batch_ci(params, target, {"tokens": tokens}, loss.sigmoid).items()}
        target_logits = target_forward(params, target)
        key = jax.random.key(seed + 0xE7A1)
        masks = {
            "unmasked": {n: jnp.ones_like(g) for n, g in ci.items()},
            "ci": ci,
            "rounded": {n: (g > 0).astype(g.dtype) for n, g in ci.items()},
            "stochastic": {n: stochastic_mask(g, sample_r(jax.random.fold_in(key, i), g.shape, "continuous"))
                           for i, (n, g) in enumerate(ci.items())},
            "random": {n: sample_r(jax.random.fold_in(key, 1000 + i), g.shape, "continuous")
                       for i, (n, g) in enumerate(ci.items())},
            "zero": {n: jnp.zeros_like(g) for n, g in ci.items()},
        }
        res = {k: jax.device_get(evaluate(params, target, {n: SiteMask(m, None) for n, m in v.items()}, target_logits))
               for k, v in masks.items()}
        ce_t = float(next_token_ce(target_logits, tokens))
        out = {"target_ce": ce_t}
        gap = float(res["zero"]["ce"]) - ce_t
        for k, r in res.items():
            out[f"ce/{k}"], out[f"kl/{k}"] = float(r["ce"]), float(r["kl"])
            out[f"ce_unrecovered/{k}"] = (float(r["ce"]) - ce_t) / gap if gap > 0 else float("nan")
        layers: dict[str, list[float]] = {}
        means, maxs, n_tokens = ci_over_held(params, target, loss.sigmoid)
        out["n_mean_ci_tokens"] = int(n_tokens)
        for n, g in ci.items():
            g = np.asarray(g)
            out[f"ci_l0/{n}"] = float(np.mean(np.sum(g > loss.ci_l0_threshold, -1)))
            out[f"n_alive_mean_ci/{n}"] = int(np.sum(means[n] > MEAN_CI_ALIVE))
            out[f"n_alive_max_ci/{n}"] = int(np.sum(maxs[n] > loss.ci_l0_threshold))
            layers.setdefault(n.split(".")[1] if n.startswith("blocks.") else "other", []).append(out[f"ci_l0/{n}"])
        for layer, vals in layers.items():
            out[f"ci_l0_layer/{layer}"] = float(sum(vals))
        out["ci_l0_total"] = float(sum(sum(v) for v in layers.values()))
        for kind in ("mean", "max"):
            out[f"n_alive_{kind}_ci"] = sum(v for k, v in out.items() if k.startswith(f"n_alive_{kind}_ci/"))
        if workdir is not None:
            spectrum_figure(means, Path(workdir) / "ci_spectrum.png")
        return out

    return analyze


def spectrum_figure(means: dict[str, np.ndarray], path: Path) -> None:
    """Each site's mean CI per subcomponent, sorted (log scale)."""
    from spdjax import plots

    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n, m in means.items():
        ax.plot(np.sort(np.asarray(m))[::-1], lw=1, label=n.replace("blocks.", "L"))
    ax.set_yscale("log")
    ax.axhline(MEAN_CI_ALIVE, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("subcomponent (sorted)")
    ax.set_ylabel("mean CI over held-out tokens")
    ax.legend(fontsize=6, ncol=2)
    plots._save(fig, path)
