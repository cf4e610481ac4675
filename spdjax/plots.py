"""Figures shared by experiments, written as PNG files (matplotlib, Agg backend).

Layout as in `spdjax.metrics`: kernel `(d_in, d_out)`, components `V (d_in, C)`, `U (C, d_out)`;
subcomponent c's column j is `V[j, c] * U[c, :]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from spdjax import metrics
from spdjax.components import Components


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def order_by_column(comps: Components, indices: Sequence[int]) -> list[int]:
    """`indices` sorted by the column j each subcomponent is largest on (then by index)."""
    norms = metrics.subcomponent_column_norms(comps)
    return sorted(indices, key=lambda c: (int(np.argmax(norms[c])), c))


def plot_columns_2d(
    kernel, comps: Components, indices: Sequence[int], path: Path, title: str = ""
) -> Path:
    """Paper Figure 1 style for a site with d_out == 2: target columns, then one panel per subcomponent.

    Each panel draws the 2-D columns (kernel[j, :] for the target; V[j, c] U[c, :] for subcomponent c)
    as arrows from the origin, coloured by column j.
    """
    K = np.asarray(kernel, np.float64)
    if K.shape[1] != 2:
        raise ValueError(f"plot_columns_2d needs d_out == 2, got kernel {K.shape}")
    V, U = np.asarray(comps.V, np.float64), np.asarray(comps.U, np.float64)
    plt = _plt()
    indices = list(indices)
    n = 1 + len(indices)
    ncol = min(n, 8)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.0 * ncol, 2.1 * nrow), squeeze=False)
    lim = 1.1 * max(np.abs(K).max(), 1e-6)
    colors = plt.get_cmap("tab10" if K.shape[0] <= 10 else "viridis")(
        np.linspace(0, 1, K.shape[0]) if K.shape[0] > 10 else np.arange(K.shape[0])
    )
    panels = [("target", K)] + [(f"subcomp {c}", V[:, c, None] * U[None, c, :]) for c in indices]
    for ax, (name, cols) in zip(axes.flat, panels):
        for j in range(cols.shape[0]):
            if np.linalg.norm(cols[j]) > 1e-3 * lim:
                ax.annotate(
                    "", xy=cols[j], xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color=colors[j], lw=1.5),
                )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.5, zorder=0)
        ax.axvline(0, color="0.85", lw=0.5, zorder=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_subcomponent_matrices(
    kernel, comps: Components, indices: Sequence[int], path: Path, title: str = "", max_panels: int = 64
) -> Path:
    """Heatmaps of the target matrix (paper layout W = kernel^T) and of each listed subcomponent U_c V_c,
    tiled into one image (one axes, so it stays fast with many subcomponents)."""
    K = np.asarray(kernel, np.float64)
    V, U = np.asarray(comps.V, np.float64), np.asarray(comps.U, np.float64)
    plt = _plt()
    indices = list(indices)[: max_panels - 1]
    panels = [("target", K.T)] + [(f"{c}", np.outer(U[c], V[:, c])) for c in indices]
    h, w = K.T.shape
    n = len(panels)
    ncol = min(n, max(1, int(np.ceil(np.sqrt(n * h / w)))), 8)
    nrow = -(-n // ncol)
    gap_x, gap_y = max(1, w // 8), max(2, h // 3)
    mosaic = np.full((nrow * (h + gap_y), ncol * (w + gap_x)), np.nan)
    for i, (_, M) in enumerate(panels):
        r, c = divmod(i, ncol)
        y, x = r * (h + gap_y) + gap_y, c * (w + gap_x)
        mosaic[y : y + h, x : x + w] = M
    vmax = max(np.abs(K).max(), 1e-6)
    scale = 1.8 / max(h, w)
    fig, ax = plt.subplots(
        figsize=(max(3.0, mosaic.shape[1] * scale + 1.2), max(2.0, mosaic.shape[0] * scale + 0.6))
    )
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="equal", interpolation="nearest")
    for i, (name, _) in enumerate(panels):
        r, c = divmod(i, ncol)
        ax.text(
            c * (w + gap_x) + w / 2 - 0.5, r * (h + gap_y) + gap_y - 0.7, name,
            ha="center", va="bottom", fontsize=7,
        )
    ax.axis("off")
    fig.colorbar(im, ax=ax, shrink=0.6)
    ax.set_title(title or "target W and subcomponents U_c V_c", fontsize=9)
    return _save(fig, path)


def plot_ci_heatmaps(
    ci: Mapping[str, np.ndarray],
    path: Path,
    patterns: Mapping[str, str] | None = None,
    title: str = "",
    max_columns: int | None = None,
) -> Path:
    """One heatmap per site of CI `(n_inputs, C)` on one-hot inputs, columns permuted.

    `patterns[site]` is `identity` (Hungarian-matched columns first) or `dense` (by CI mass; the
    default for sites not listed). `max_columns` truncates the permuted columns shown.
    """
    plt = _plt()
    patterns = dict(patterns or {})
    names = list(ci)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    im = None
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        g = np.asarray(ci[name], np.float64)
        kind = patterns.get(name, "dense")
        if kind == "identity" and g.shape[1] >= g.shape[0]:
            g, perm = metrics.permute_to_identity(g)
        else:
            g, perm = metrics.permute_to_dense(g)
        if max_columns is not None:
            g, perm = g[:, :max_columns], perm[:max_columns]
        im = ax.imshow(g, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} ({kind})", fontsize=9)
        ax.set_xlabel("subcomponent (permuted)")
        if i == 0:
            ax.set_ylabel("input i (one-hot)")
        if g.shape[1] <= 24:
            ax.set_xticks(range(g.shape[1]))
            ax.set_xticklabels([str(int(p)) for p in perm], fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="CI")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_scatter_panels(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
) -> Path:
    """One scatter panel per entry `name: (x, y)` (arrays flattened), with the diagonal y = x dashed."""
    plt = _plt()
    names = list(panels)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.4 * max(1, len(names)), 3.4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        x, y = (np.ravel(np.asarray(a, np.float64)) for a in panels[name])
        lo, hi = min(x.min(initial=0.0), y.min(initial=0.0)), max(x.max(initial=0.0), y.max(initial=0.0))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, zorder=0)
        ax.scatter(x, y, s=4, alpha=0.5, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        if i == 0:
            ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_bars(values: np.ndarray, path: Path, xlabel: str = "", ylabel: str = "", title: str = "") -> Path:
    """One bar per entry of the 1-D `values` (e.g. a per-feature error)."""
    plt = _plt()
    v = np.ravel(np.asarray(values, np.float64))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.06 * len(v) + 2), 3.0))
    ax.bar(np.arange(len(v)), v, width=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
