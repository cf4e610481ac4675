"""Writing a clustering: `clusters.json`, `merge_history.npz` and two figures.

- `clusters.json`: the settings, the inputs' sizes, per seed the stop, group count and description
  length there, the stability across seeds, the ground-truth evaluation when there is one, and the
  chosen groups (members `[site, index]`, size, activation frequency), largest first.
- `merge_history.npz`: `members` (the n subcomponents `site/index` in column order), and per seed s
  `pairs_s (n-1, 2)` (column j merged into column i at iteration t), `dL_s`, `L_s (n,)` and `stop_s`;
  `labels` the chosen clustering. `MergeHistory.labels_at` replays any iteration.
- `cost_curve.png`: description length against the number of merges per seed, stops marked;
  `coactivation.png`: the co-activation matrix (Jaccard: c_ij / (s_i + s_j - c_ij)) with the
  subcomponents ordered by group, group borders drawn.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from spdjax.clustering.cluster import Clustering
from spdjax.clustering.mdl import coactivations
from spdjax.plots import _plt, _save
from spdjax.workdir import atomic_write_text

CLUSTERS = "clusters.json"
HISTORY = "merge_history.npz"
MAX_MATRIX = 1500  # the co-activation figure shows at most this many subcomponents (the most frequent)


def summary(clustering: Clustering, evaluation: dict | None = None) -> dict:
    acts = clustering.activations
    per_seed = []
    for s, h in zip(clustering.seeds, clustering.histories):
        per_seed.append({"seed": s, "stop": h.stop, "n_groups": int(h.n - h.stop), "L_start": float(h.L[0]),
                         "L_stop": float(h.L[h.stop])})
    return {
        "merge": dataclasses.asdict(clustering.config),
        "tau": acts.tau,
        "freq_floor": acts.freq_floor,
        "n_samples": acts.n_samples,
        "n_subcomponents": int(acts.acts.shape[1]),
        "n_dropped": acts.n_dropped,
        "seeds": per_seed,
        "n_groups": int(clustering.labels.max() + 1),
        "stability": clustering.stability(),
        "evaluation": evaluation or {},
        "groups": clustering.groups(),
    }


def write(clustering: Clustering, outdir: str | Path, evaluation: dict | None = None, figures: bool = True) -> dict:
    """Write the clustering's files into `outdir` (created); returns the `clusters.json` content."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = summary(clustering, evaluation)
    atomic_write_text(outdir / CLUSTERS, json.dumps(out, indent=1))
    arrays = {"members": np.array([f"{s}/{c}" for s, c in clustering.activations.members]),
              "labels": clustering.labels}
    for s, h in zip(clustering.seeds, clustering.histories):
        arrays.update({f"pairs_{s}": h.pairs, f"dL_{s}": h.dL, f"L_{s}": h.L, f"stop_{s}": np.int64(h.stop)})
    tmp = outdir / f".{HISTORY}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(outdir / HISTORY)
    if figures:
        cost_curve(clustering, outdir / "cost_curve.png")
        coactivation_matrix(clustering, outdir / "coactivation.png")
    return out


def cost_curve(clustering: Clustering, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for s, h in zip(clustering.seeds, clustering.histories):
        line, = ax.plot(np.arange(len(h.L)), h.L, lw=1, label=f"seed {s}")
        ax.axvline(h.stop, color=line.get_color(), ls=":", lw=1)
        ax.plot([h.stop], [h.L[h.stop]], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("merges")
    ax.set_ylabel("description length L (bits)")
    ax.set_title(f"MDL merge (alpha {clustering.config.alpha:g}, {clustering.config.sampler}); dotted: stop")
    ax.legend(fontsize=7)
    return _save(fig, path)


def coactivation_matrix(clustering: Clustering, path: Path) -> Path:
    acts, labels = clustering.activations, clustering.labels
    cols = np.arange(acts.acts.shape[1])
    if cols.size > MAX_MATRIX:
        cols = np.sort(np.argsort(-acts.frequency, kind="stable")[:MAX_MATRIX])
    sizes = np.bincount(labels)
    order = cols[np.lexsort((-acts.frequency[cols], labels[cols], -sizes[labels[cols]]))]  # big groups first
    c = coactivations(acts.acts[:, order]).astype(np.float64)
    s = np.diag(c)
    jaccard = c / np.maximum(s[:, None] + s[None, :] - c, 1.0)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(jaccard, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    edges = np.flatnonzero(np.diff(labels[order])) + 0.5
    if edges.size <= 60:  # more borders hide the matrix
        for e in edges:
            ax.axhline(e, color="w", lw=0.3)
            ax.axvline(e, color="w", lw=0.3)
    fig.colorbar(im, ax=ax, label="Jaccard co-activation")
    shown = "" if cols.size == labels.size else f" ({cols.size} most frequent of {labels.size})"
    ax.set_title(f"co-activation ordered by group: {labels.max() + 1} groups{shown}", fontsize=9)
    ax.set_xlabel("subcomponent")
    ax.set_ylabel("subcomponent")
    return _save(fig, path)
