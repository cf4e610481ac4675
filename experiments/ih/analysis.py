"""What an induction-head decomposition found (transformers.md, "What success means"): metrics for the
run's summary and PNG figures.

Positions in a sequence (`experiments.ih.data`): S at `m_pos - 1`, M at `m_pos`, the final S at 63.
The circuit: layer 0 at M attends to S (previous token), so M's residual carries "after S"; layer 1 at
the final S attends to M (induction) and copies M into the logits.

Maskings (all sites at once; last-token accuracy and cross-entropy): `unmasked` (all masks 1), `ci`
(masks = CI), `rounded_ci` (1 where CI > 0), `stochastic` (g + (1 - g) r, r ~ U(0, 1), mean of
`N_STOCHASTIC` draws), `zero` (all masks 0).

Ablations (`ablation/<site>/<token>/...`): all masks 1, except that at one site and one circuit token
(`S`, `M` or `final`) the subcomponents active there (CI > the CI-L0 threshold, per sequence) get mask 0.
Reported: accuracy, `prev_at_m` (layer-0 attention M -> S), `induction` (layer-1 attention final -> M),
the mean number ablated, and `control_*`: the same number of subcomponents inactive at that token,
drawn at random, ablated instead (the circuit predicts no change).

Attention (`attention_kl/<layer>`): KL(target || CI-masked) of each query's attention row, mean over
queries and sequences; `attention_kl_circuit/<layer>`: the same on the circuit's query (layer 0 at M,
layer 1 at the final S). `qk_offset/<layer>/...`: the weight-only query-key interaction through the
position encodings as a function of the offset t - s (`qk_offset_scores`), for the target and summed
over the q/k subcomponent pairs active at the circuit's tokens: the argmax offset of each and their
correlation over offsets 0..15.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from experiments.ih.model import attention_scores, sinusoidal
from spdjax import metrics, plots
from spdjax.losses import masked_forward
from spdjax.masks import SiteMask, sample_r, stochastic_mask
from spdjax.targets.base import Target

MASKINGS = ("unmasked", "ci", "rounded_ci", "stochastic", "zero")
TOKENS = ("S", "M", "final")
N_STOCHASTIC = 4
QK_OFFSETS = 16  # offsets shown and scored (larger ones average over few positions)
_EPS = 1e-12


def token_positions(m_pos: Int[Array, " B"], T: int = 64) -> dict[str, Int[Array, " B"]]:
    """Index of each circuit token per sequence."""
    return {"S": m_pos - 1, "M": m_pos, "final": jnp.full_like(m_pos, T - 1)}


def last_token_stats(logits: Float[Array, "B V"], labels: Int[Array, " B"]) -> dict[str, Array]:
    """Accuracy and cross-entropy (nats) of the last-token prediction."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), "ce": jnp.mean(ce)}


def attention_kl(p: Float[Array, "B T T"], q: Float[Array, "B T T"]) -> Array:
    """Mean over sequences and query positions of KL(p_row || q_row) (causal rows; zeros contribute 0)."""
    p, q = p.astype(jnp.float32), q.astype(jnp.float32)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.maximum(p, _EPS)) - jnp.log(jnp.maximum(q, _EPS))), 0.0), -1)
    return jnp.mean(kl)


@functools.partial(jax.jit, static_argnames=("site",))
def ablation_masks(
    ci: dict[str, Float[Array, "B T C"]], site: str, pos: Int[Array, " B"], threshold: float, key: Array | None
) -> tuple[dict[str, SiteMask], Array]:
    """All-ones masks except `site` at token `pos[b]`: mask 0 on the subcomponents active there (CI >
    `threshold`), or, with `key`, on as many inactive ones drawn at random. Returns (masks, mean count)."""
    g = ci[site]
    B, _, C = g.shape
    at = g[jnp.arange(B), pos] > threshold  # (B, C)
    if key is None:
        drop = at
    else:
        k = jnp.sum(at, -1, keepdims=True)
        score = jnp.where(at, -jnp.inf, jax.random.uniform(key, (B, C)))
        rank = jnp.argsort(jnp.argsort(-score, -1), -1)  # 0 = highest score
        drop = (rank < k) & ~at
    row = jnp.ones((B, C), g.dtype) - drop.astype(g.dtype)
    mask = jnp.ones_like(g).at[jnp.arange(B), pos].set(row)
    masks = {n: SiteMask(jnp.ones_like(v), None) for n, v in ci.items()}
    masks[site] = SiteMask(mask, None)
    return masks, jnp.mean(jnp.sum(drop, -1).astype(jnp.float32))


@jax.jit
def qk_offset_scores(
    Vq: Float[Array, "d C"], Uq: Float[Array, "C d"], Vk: Float[Array, "d C"], Uk: Float[Array, "C d"],
    pos: Float[Array, "T d"],
) -> Float[Array, "C C T"]:
    """Weight-only query-key interaction of q subcomponent c and k subcomponent c' through the position
    encodings: `f[c, c', D] = mean_t (pos_t Vq_c)(Uq_c . Uk_c')(pos_{t-D} Vk_c') / sqrt(d_head)` over
    t >= D. Summed over all pairs it is the target's positional score `pos_t Wq Wk^T pos_{t-D}^T / sqrt(d)`
    (averaged over t) when U V = W."""
    T = pos.shape[0]
    aq, ak = pos @ Vq, pos @ Vk  # (T, C)
    G = Uq @ Uk.T / math.sqrt(Uq.shape[-1])  # (C, C)
    cols = []
    for D in range(T):
        cols.append(jnp.einsum("tc,te->ce", aq[D:], ak[: T - D]) / (T - D))
    return G[:, :, None] * jnp.stack(cols, -1)


def make_analyze(held: dict, target_acc: float, target_info: dict, pattern_apply, d_model: int, seed: int):
    """`analyze(params, target, workdir, loss) -> flat summary dict` (module docstring), figures into
    `workdir`. `held`: held-out `{"tokens", "label", "m_pos"}`; `pattern_apply`: the target's `apply_fn`
    for a call returning `(logits, patterns)` (same params and sites)."""
    tokens, labels, m_pos = held["tokens"], held["label"], held["m_pos"]
    T = tokens.shape[1]
    positions = token_positions(m_pos, T)

    @jax.jit
    def evaluate(params, target, masks):
        """Last-token stats and attention scores of the model under `masks` ({}: the target itself)."""
        logits, patterns = masked_forward(params, target, {"tokens": tokens}, masks)
        return {**last_token_stats(logits[:, -1], labels), **attention_scores(patterns, m_pos)}, patterns

    def masking_metrics(params, target, ci, key):
        fixed = {
            "target": {},
            "unmasked": {n: SiteMask(jnp.ones_like(g), None) for n, g in ci.items()},
            "ci": {n: SiteMask(g, None) for n, g in ci.items()},
            "rounded_ci": {n: SiteMask((g > 0).astype(g.dtype), None) for n, g in ci.items()},
            "zero": {n: SiteMask(jnp.zeros_like(g), None) for n, g in ci.items()},
        }
        out, pats = {}, {}
        for name, masks in fixed.items():
            out[name], patterns = evaluate(params, target, masks)
            if name in ("target", "ci"):
                pats[name] = patterns
        draws = []
        for i in range(N_STOCHASTIC):
            masks = {
                n: SiteMask(stochastic_mask(g, sample_r(jax.random.fold_in(key, 97 * i + j), g.shape, "continuous")), None)
                for j, (n, g) in enumerate(ci.items())
            }
            draws.append(evaluate(params, target, masks)[0])
        out["stochastic"] = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *draws)
        return out, pats

    def ablation(params, target, ci, threshold, key):
        out = {}
        for i, site in enumerate(ci):
            for j, (tok, pos) in enumerate(positions.items()):
                row = {}
                for kind, k in (("", None), ("control_", jax.random.fold_in(key, 31 * i + j))):
                    masks, n = ablation_masks(ci, site, pos, threshold, k)
                    s = evaluate(params, target, masks)[0]
                    row.update({f"{kind}{m}": s[m] for m in ("accuracy", "prev_at_m", "induction")})
                    row[f"{kind}n"] = n
                out[(site, tok)] = row
        return out

    def analyze(params, target: Target, workdir: Path | None, loss) -> dict:
        tp = dataclasses.replace(target, apply_fn=pattern_apply)  # same params and sites, returns patterns too
        ci = metrics.batch_ci(params, target, {"tokens": tokens}, loss.sigmoid)
        ci = {s.name: jnp.asarray(ci[s.name]) for s in target.sites}  # model order: q, k, v, o per layer
        thr = loss.ci_l0_threshold
        res, pats = masking_metrics(params, tp, ci, jax.random.key(seed + 0xA11))
        res, pats = jax.device_get((res, pats))
        out = {"target_accuracy": target_acc, **{f"target_{k}": v for k, v in target_info.items()}}
        for name in MASKINGS:
            for k in ("accuracy", "ce", "prev_at_m", "induction"):
                out[f"{k}/{name}"] = float(res[name][k])
            out[f"accuracy_ratio/{name}"] = float(res[name]["accuracy"]) / max(target_acc, 1e-12)
        out["target_ce"] = float(res["target"]["ce"])
        for layer in range(len(pats["ci"])):
            p_t, p_c = jnp.asarray(pats["target"][layer]), jnp.asarray(pats["ci"][layer])
            out[f"attention_kl/{layer}"] = float(attention_kl(p_t, p_c))
            q = positions["M" if layer == 0 else "final"]
            rows = jnp.arange(p_t.shape[0])
            out[f"attention_kl_circuit/{layer}"] = float(attention_kl(p_t[rows, q][:, None], p_c[rows, q][:, None]))
        for n, g in ci.items():
            g_np = np.asarray(g)
            out[f"ci_l0_final_token/{n}"] = float(np.mean(np.sum(g_np[:, -1] > thr, -1)))
            out[f"ci_l0/{n}"] = float(np.mean(np.sum(g_np > thr, -1)))
            for tok in ("S", "M"):
                idx = np.asarray(positions[tok])
                out[f"ci_l0_{tok}_token/{n}"] = float(np.mean(np.sum(g_np[np.arange(len(idx)), idx] > thr, -1)))
        abl = jax.device_get(ablation(params, tp, ci, thr, jax.random.key(seed + 0xAB1)))
        for (site, tok), row in abl.items():
            for k, v in row.items():
                out[f"ablation/{site}/{tok}/{k}"] = float(v)
        qk = qk_tables(params, target, d_model, T, ci, thr)
        for layer, t in qk.items():
            out[f"qk_offset/{layer}/target_argmax"] = int(np.argmax(t["target"]))
            out[f"qk_offset/{layer}/active_argmax"] = int(np.argmax(t["active"]))
            out[f"qk_offset/{layer}/active_corr"] = float(np.corrcoef(t["target"], t["active"])[0, 1])
            out[f"qk_offset/{layer}/n_active_pairs"] = int(t["n_pairs"])
        if workdir is not None:
            figures(Path(workdir), held, pats, abl, qk, ci, thr, list(ci))
        return out

    def qk_tables(params, target: Target, d: int, T: int, ci, threshold: float):
        """Per layer, over offsets 0..QK_OFFSETS-1: the target's positional q.k score, the decomposition's
        (all pairs), the sum over the pairs active at the circuit's tokens (layer 0: q at M, k at S;
        layer 1: q at the final S, k at M; mean CI > `threshold`), and the pairs whose score varies
        most with the offset."""
        pos = sinusoidal(T, d)
        kernels = target.kernels()
        rows = np.arange(tokens.shape[0])
        at = {t: np.asarray(p) for t, p in positions.items()}
        circuit = {0: ("M", "S"), 1: ("final", "M")}
        out = {}
        for layer, (q_tok, k_tok) in circuit.items():
            q, k = f"blocks.{layer}.attn.q", f"blocks.{layer}.attn.k"
            if q not in params.components or k not in params.components:
                continue
            cq, ck = params.components[q], params.components[k]
            F = np.asarray(qk_offset_scores(cq.V, cq.U, ck.V, ck.U, pos))[:, :, :QK_OFFSETS]
            Ft = np.asarray(qk_offset_scores(kernels[q], jnp.eye(d), kernels[k], jnp.eye(d), pos)).sum((0, 1))
            aq = np.asarray(ci[q])[rows, at[q_tok]].mean(0) > threshold
            ak = np.asarray(ci[k])[rows, at[k_tok]].mean(0) > threshold
            spread = F.std(-1)
            order = np.dstack(np.unravel_index(np.argsort(-spread, axis=None), spread.shape))[0]
            out[layer] = {
                "target": Ft[:QK_OFFSETS], "all": F.sum((0, 1)), "active": F[aq][:, ak].sum((0, 1)),
                "n_pairs": int(aq.sum() * ak.sum()), "tokens": (q_tok, k_tok),
                "top": [(int(c), int(e), F[c, e]) for c, e in order[:3]],
            }
        return out

    return analyze


def figures(workdir: Path, held, pats, abl, qk, ci, threshold: float, sites: list[str]) -> None:
    """`ih_attention.png`, `ih_attention_offsets.png`, `ih_ablation.png`, `ih_qk_offset.png`,
    `ih_ci_tokens.png` (module docstring)."""
    plt = plots._plt()
    tokens, m_pos = np.asarray(held["tokens"]), np.asarray(held["m_pos"])
    n_layers = len(pats["target"])

    # one sequence: target vs CI-masked attention per layer
    b = 0
    fig, axes = plt.subplots(n_layers, 3, figsize=(11, 3.6 * n_layers), squeeze=False)
    for layer in range(n_layers):
        a_t, a_c = np.asarray(pats["target"][layer][b]), np.asarray(pats["ci"][layer][b])
        for ax, a, title in ((axes[layer, 0], a_t, "target"), (axes[layer, 1], a_c, "CI-masked"),
                             (axes[layer, 2], np.abs(a_t - a_c), "|difference|")):
            im = ax.imshow(a, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer} head 0: {title}", fontsize=9)
            for p, lbl in ((m_pos[b] - 1, "S"), (m_pos[b], "M")):
                ax.axvline(p, color="w", lw=0.5, ls=":")
                ax.text(p, -1.5, lbl, ha="center", fontsize=7)
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
        fig.colorbar(im, ax=axes[layer].tolist(), shrink=0.8)
    fig.suptitle("attention of one held-out sequence (S, M dotted)", fontsize=10)
    plots._save(fig, workdir / "ih_attention.png")

    # averaged views: layer 0 by offset (all queries, and at M), layer 1 final row relative to M
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    T = tokens.shape[1]
    offs = np.arange(0, 8)
    B = tokens.shape[0]
    for name, style in (("target", "-o"), ("ci", "--x")):
        a0 = np.asarray(pats[name][0])
        by_off = [np.mean([a0[:, t, t - d].mean() for t in range(d, T)]) for d in offs]
        at_m = [a0[np.arange(B), m_pos, np.maximum(m_pos - d, 0)].mean() for d in offs]
        lbl = "target" if name == "target" else "CI-masked"
        axes[0].plot(offs, by_off, style, label=f"{lbl}: all queries")
        axes[0].plot(offs, at_m, style, label=f"{lbl}: query at M")
        a1 = np.asarray(pats[name][1])
        rel = np.arange(-4, 5)
        vals = [np.mean(a1[np.arange(B), -1, np.clip(m_pos + r, 0, T - 1)]) for r in rel]
        axes[1].plot(rel, vals, style, label=lbl)
    axes[0].set_xlabel("offset (query - key)")
    axes[0].set_ylabel("mean attention")
    axes[0].set_title("layer 0: previous-token head", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("key position - M's position")
    axes[1].set_title("layer 1: attention from the final S (induction)", fontsize=9)
    axes[1].legend(fontsize=7)
    plots._save(fig, workdir / "ih_attention_offsets.png")

    # ablation table as grouped bars
    rows = [(s, t) for s in sites for t in TOKENS]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.35 * len(rows) + 2), 8), sharex=True)
    for ax, key, title in zip(axes, ("accuracy", "prev_at_m", "induction"),
                              ("last-token accuracy", "layer-0 attention M -> S", "layer-1 attention final -> M")):
        ax.bar(x - 0.2, [abl[r][key] for r in rows], 0.4, label="active subcomponents ablated")
        ax.bar(x + 0.2, [abl[r][f"control_{key}"] for r in rows], 0.4, label="as many inactive ones (control)")
        ax.set_ylabel(title, fontsize=8)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels([f"{s.replace('blocks.', 'L').replace('.attn.', '')}@{t}" for s, t in rows], rotation=90, fontsize=7)
    fig.suptitle("mask 0 the subcomponents active at one token of one site (all other masks 1)", fontsize=10)
    plots._save(fig, workdir / "ih_ablation.png")

    # weight-only query-key interaction through the position encodings (softmax ignores a constant shift:
    # each curve is shown minus its mean over the offsets)
    fig, axes = plt.subplots(1, max(1, len(qk)), figsize=(5 * max(1, len(qk)), 3.4), squeeze=False)
    for ax, (layer, t) in zip(axes.flat, qk.items()):
        D = np.arange(len(t["target"]))
        q_tok, k_tok = t["tokens"]
        for curve, style, lbl in (
            (t["target"], "k-", "target (all of Wq, Wk)"),
            (t["all"], "k:", "all subcomponent pairs"),
            (t["active"], "r-", f"pairs active (q at {q_tok}, k at {k_tok}): {t['n_pairs']}"),
        ):
            ax.plot(D, curve - curve.mean(), style, lw=2 if style == "k-" else 1.2, label=lbl)
        for c, e, f in t["top"]:
            ax.plot(D, f - f.mean(), lw=0.8, alpha=0.7, label=f"q{c} x k{e}")
        ax.set_xlabel("offset t - s")
        ax.set_ylabel("positional q.k score (centred)")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.legend(fontsize=6)
    plots._save(fig, workdir / "ih_qk_offset.png")

    # mean CI per subcomponent at the circuit tokens
    fig, axes = plt.subplots(1, len(sites), figsize=(2.2 * len(sites), 3.0), squeeze=False)
    B = m_pos.shape[0]
    pos = {"S": m_pos - 1, "M": m_pos, "final": np.full(B, T - 1)}
    for ax, site in zip(axes.flat, sites):
        g = np.asarray(ci[site])
        mat = np.stack([g[np.arange(B), pos[t]].mean(0) for t in TOKENS])  # (3, C)
        order = np.argsort(-mat.max(0))
        keep = order[: max(1, int(np.sum(mat.max(0) > threshold / 4)))][:24]
        ax.imshow(mat[:, keep], cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(TOKENS)))
        ax.set_yticklabels(TOKENS, fontsize=7)
        ax.set_xticks(range(len(keep)))
        ax.set_xticklabels([str(int(c)) for c in keep], fontsize=5, rotation=90)
        ax.set_title(site.replace("blocks.", "L").replace(".attn.", " "), fontsize=8)
    fig.suptitle("mean CI at the circuit tokens (subcomponents with any)", fontsize=10)
    plots._save(fig, workdir / "ih_ci_tokens.png")
