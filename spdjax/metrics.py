"""Ground-truth metrics of a decomposition: MMCS / ML2R, alive subcomponents, CI-L0, IdentityCIError.

Alive subcomponents are counted by causal importance (toy_models.md, as the reference's alive-components
metric): CI > `CI_ALIVE_THRESHOLD` (0.1) on at least one held-out input (`n_ci_active`, summary keys
`n_alive/<site>`, `n_alive`; see `alive_counts`). The norm count `n_alive` (liveness score
sum_j ||U_c V_c,j|| > 0.017) is secondary (summary keys `n_alive_norm/<site>`, `n_alive_norm`).

Host-side, pure functions on arrays (NumPy float64 inside; JAX arrays are accepted). Layout as in the
library: a site's kernel is `(d_in, d_out)` (= the paper's W^T); components hold `V: (d_in, C)` and
`U: (C, d_out)`; subcomponent c as a kernel is `outer(V[:, c], U[c, :])`. Column j of the paper's W is
`kernel[j, :]`, and subcomponent c's column j is `V[j, c] * U[c, :]`.

`one_hot_ci` / `batch_ci` compute the (lower-leaky) CI of every site of a target for given params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from spdjax.components import Components
from spdjax.losses.forward import clean_forward, compute_ci, masked_forward
from spdjax.masks import deterministic_masks

CI_PATTERNS = ("identity", "dense")
CI_ALIVE_THRESHOLD = 0.1  # toy_models.md: alive = CI above 0.1 on at least one held-out input
NORM_ALIVE_THRESHOLD = 0.017  # the reference plots' liveness-score threshold (secondary count)


def _vu(comps: Components) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(comps.V, np.float64), np.asarray(comps.U, np.float64)


def subcomponent_column_norms(comps: Components) -> np.ndarray:
    """`(C, d_in)`: ||V[j, c] * U[c, :]|| = |V[j, c]| * ||U[c, :]|| for every subcomponent c and column j."""
    V, U = _vu(comps)
    return np.abs(V).T * np.linalg.norm(U, axis=1)[:, None]


def subcomponent_norms(comps: Components) -> np.ndarray:
    """`(C,)`: sum_j ||U_c V_{c,j}|| over the columns j (the reference's liveness score)."""
    return subcomponent_column_norms(comps).sum(axis=1)


def n_alive(comps: Components, threshold: float = NORM_ALIVE_THRESHOLD) -> int:
    """Norm count: subcomponents with sum_j |V[j, c]| * ||U[c, :]|| > threshold (reference plots: 0.017).

    The secondary liveness count (summary key `n_alive_norm/<site>`); the summaries' `n_alive/<site>`
    counts by CI (`n_ci_active`). Dead subcomponents that share a small correction evenly can sit
    above any fixed norm threshold while never firing.
    """
    return int(np.sum(subcomponent_norms(comps) > threshold))


def liveness_gap(comps: Components) -> tuple[int, float]:
    """Threshold-free liveness: `(n, ratio)`, where the sorted liveness scores `s_1 >= s_2 >= ...` have
    their largest ratio `s_n / s_{n+1}` at n (scores <= 0 count as the smallest positive float).

    A clean decomposition has a wide gap after its n real subcomponents, even when dead ones hover
    around a fixed threshold; `ratio` says how clean (1: no gap at all).
    """
    s = np.sort(np.maximum(subcomponent_norms(comps), np.finfo(np.float64).tiny))[::-1]
    if s.size < 2:
        return int(s.size), 1.0
    r = s[:-1] / s[1:]
    n = int(np.argmax(r))
    return n + 1, float(r[n])


def alive_indices(comps: Components, threshold: float = NORM_ALIVE_THRESHOLD) -> np.ndarray:
    """Indices of the subcomponents alive by norm (`n_alive`), largest liveness score first."""
    norms = subcomponent_norms(comps)
    idx = np.flatnonzero(norms > threshold)
    return idx[np.argsort(-norms[idx], kind="stable")]


def column_cosines(kernel, comps: Components) -> tuple[np.ndarray, np.ndarray]:
    """Cosines `(C, d_in)` between subcomponent columns and target columns, and norm ratios `(C, d_in)`.

    `cos[c, j] = cos(V[j, c] U[c, :], kernel[j, :])`; `ratio[c, j] = ||V[j, c] U[c, :]|| / ||kernel[j, :]||`.
    Where either column has zero norm the cosine is undefined: `cos = -inf`, `ratio = 0`.
    """
    K = np.asarray(kernel, np.float64)
    V, U = _vu(comps)
    if K.shape != (V.shape[0], U.shape[1]):
        raise ValueError(f"kernel {K.shape} does not match components V {V.shape}, U {U.shape}")
    sub_norm = subcomponent_column_norms(comps)  # (C, d_in)
    k_norm = np.linalg.norm(K, axis=1)  # (d_in,)
    dots = V.T * (U @ K.T)  # (C, d_in): V[j,c] * <U[c], K[j]>
    denom = sub_norm * k_norm[None, :]
    cos = np.divide(dots, denom, out=np.full_like(dots, -np.inf), where=denom > 0)
    ratio = np.divide(sub_norm, k_norm[None, :], out=np.zeros_like(sub_norm), where=denom > 0)
    return cos, ratio


def mmcs_ml2r(kernel, comps: Components) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio of a site's columns (toy_models.md).

    kernel: `(d_in, d_out)`; comps: `V (d_in, C)`, `U (C, d_out)`.
    MMCS = mean_j max_c cos(V[j, c] U[c, :], kernel[j, :]);
    ML2R = mean_j ||V[j, m_j] U[m_j, :]|| / ||kernel[j, :]|| with m_j the argmax above.
    For TMS linear1 the columns j are the n_features columns of the paper's W. Zero-norm columns are
    no candidates; a column j with no candidate at all contributes cosine 0 and ratio 0.
    """
    cos, ratio = column_cosines(kernel, comps)
    best = np.argmax(cos, axis=0)
    cols = np.arange(cos.shape[1])
    c, r = cos[best, cols], ratio[best, cols]
    none = np.isneginf(c)
    c, r = np.where(none, 0.0, c), np.where(none, 0.0, r)
    return float(np.mean(c)), float(np.mean(r))


def mmcs_ml2r_dense(kernel, comps) -> tuple[float, float]:
    """MMCS and ML2R (as `mmcs_ml2r`) for components given as dense kernels `comps: (C, d_in, d_out)`
    (APD: component c's kernel at a site is `A_c B_c`); column j of component c is `comps[c, j, :]`."""
    K = np.asarray(kernel, np.float64)
    P = np.asarray(comps, np.float64)
    if P.shape[1:] != K.shape:
        raise ValueError(f"kernel {K.shape} does not match components {P.shape}")
    p_norm = np.linalg.norm(P, axis=2)  # (C, d_in)
    k_norm = np.linalg.norm(K, axis=1)  # (d_in,)
    dots = np.einsum("cjo,jo->cj", P, K)
    denom = p_norm * k_norm[None, :]
    cos = np.divide(dots, denom, out=np.full_like(dots, -np.inf), where=denom > 0)
    ratio = np.divide(p_norm, k_norm[None, :], out=np.zeros_like(p_norm), where=denom > 0)
    best = np.argmax(cos, axis=0)
    cols = np.arange(cos.shape[1])
    c, r = cos[best, cols], ratio[best, cols]
    none = np.isneginf(c)
    return float(np.mean(np.where(none, 0.0, c))), float(np.mean(np.where(none, 0.0, r)))


def dense_component_norms(comps) -> np.ndarray:
    """`(C,)`: sum_j ||comps[c, j, :]|| for dense component kernels `(C, d_in, d_out)` (the liveness
    score of `subcomponent_norms`, for components of any rank)."""
    return np.linalg.norm(np.asarray(comps, np.float64), axis=2).sum(axis=1)


def ci_l0(ci, threshold: float = 0.1) -> float:
    """Mean over inputs (all leading axes) of the number of subcomponents with CI > threshold.

    ci: `(*lead, C)`.
    """
    ci = np.asarray(ci)
    return float(np.mean(np.sum(ci > threshold, axis=-1)))


def n_ci_active(ci, threshold: float = CI_ALIVE_THRESHOLD) -> int:
    """Subcomponents whose CI exceeds `threshold` on at least one input (the PyTorch reference's
    CI-based liveness, `ci_alive_threshold`): the alive count of toy_models.md. ci: `(*lead, C)`."""
    ci = np.asarray(ci)
    return int(np.sum(np.any(ci.reshape(-1, ci.shape[-1]) > threshold, axis=0)))


def alive_counts(
    components: dict[str, Components],
    sites,
    ci: dict[str, Any],
    ci_threshold: float = CI_ALIVE_THRESHOLD,
    norm_threshold: float = NORM_ALIVE_THRESHOLD,
) -> dict[str, int]:
    """The alive summary keys of a decomposition.

    `n_alive/<site>` for every site in `sites` (tied and identity sites included; a tied site's CI
    function is its own): subcomponents with CI > `ci_threshold` on at least one input of `ci[site]`
    `(*lead, C)` (the held-out batch). `n_alive`: the distinct alive subcomponents, each primary site's
    set of components counted once (alive where it or a site tied to it fires), so the perfect TMS
    5-2 + ID solution has n_f + n_h = 7. `n_alive_norm/<site>` for every primary site: the norm count
    `n_alive(components[site], norm_threshold)`; `n_alive_norm` their sum.
    """
    alive = {s.name: np.any(np.asarray(ci[s.name]).reshape(-1, np.shape(ci[s.name])[-1]) > ci_threshold, axis=0)
             for s in sites}
    out = {f"n_alive/{n}": int(a.sum()) for n, a in alive.items()}
    primary = [s.name for s in sites if s.tied_to is None]
    union = {n: alive[n].copy() for n in primary}
    for s in sites:
        if s.tied_to is not None:
            union[s.tied_to] |= alive[s.name]
    out["n_alive"] = int(sum(u.sum() for u in union.values()))
    norm = {f"n_alive_norm/{n}": n_alive(components[n], norm_threshold) for n in primary}
    out.update(norm)
    out["n_alive_norm"] = sum(norm.values())
    return out


def permute_to_identity(ci) -> tuple[np.ndarray, np.ndarray]:
    """Columns of `ci: (n, C)` (C >= n) reordered so the matrix is as close to identity as possible.

    Hungarian matching (maximum total CI) assigns one column to each row; the matched columns come first
    in row order, the unmatched ones after them in index order. Returns `(permuted (n, C), perm (C,))`.
    """
    ci = np.asarray(ci, np.float64)
    n, C = ci.shape
    if C < n:
        raise ValueError(f"identity pattern needs at least as many columns as rows, got {ci.shape}")
    rows, cols = linear_sum_assignment(ci, maximize=True)
    matched = cols[np.argsort(rows)]
    rest = np.setdiff1d(np.arange(C), matched)
    perm = np.concatenate([matched, rest]).astype(np.int64)
    return ci[:, perm], perm


def permute_to_dense(ci) -> tuple[np.ndarray, np.ndarray]:
    """Columns of `ci: (n, C)` sorted by total CI mass, largest first (stable). Returns `(permuted, perm)`."""
    ci = np.asarray(ci, np.float64)
    perm = np.argsort(-ci.sum(axis=0), kind="stable")
    return ci[:, perm], perm


def identity_ci_error(ci_one_hot, kind: str, k: int | None = None, tol: float = 0.1) -> int:
    """IdentityCIError of one site: how many CI entries deviate from the expected pattern (0: perfect).

    ci_one_hot: `(n_inputs, C)`, CI on the one-hot inputs x = 0.75 e_i.
    kind `identity` (one subcomponent per input feature): Hungarian-match columns to rows, then count
      off-diagonal entries > tol (unmatched columns included) plus diagonal entries < 1 - tol.
    kind `dense` (k subcomponents active on every input): sort columns by CI mass; count entries
      < 1 - tol in the first k columns plus entries > tol in the remaining columns.
    """
    ci = np.asarray(ci_one_hot, np.float64)
    if ci.ndim != 2:
        raise ValueError(f"identity_ci_error: expected a (n_inputs, C) matrix, got shape {ci.shape}")
    if kind == "identity":
        p, _ = permute_to_identity(ci)
        n = p.shape[0]
        diag = np.zeros(p.shape, bool)
        diag[np.arange(n), np.arange(n)] = True
        return int(np.sum(p[~diag] > tol) + np.sum(p[diag] < 1 - tol))
    if kind == "dense":
        if k is None or not 0 <= k <= ci.shape[1]:
            raise ValueError(f"identity_ci_error: dense pattern needs 0 <= k <= C={ci.shape[1]}, got {k!r}")
        p, _ = permute_to_dense(ci)
        return int(np.sum(p[:, :k] < 1 - tol) + np.sum(p[:, k:] > tol))
    raise ValueError(f"identity_ci_error: unknown pattern {kind!r}; allowed: {list(CI_PATTERNS)}")


# ----------------------------------------------------------------------------- CI of a target


def _ci_fn(params, target, batch, sigmoid: str):
    _, inputs = clean_forward(target, batch)
    return compute_ci(params, target, inputs, sigmoid).lower


_ci_jit = jax.jit(_ci_fn, static_argnames="sigmoid")


def batch_ci(params, target, batch: Any, sigmoid: str = "leaky_hard") -> dict[str, np.ndarray]:
    """Lower-leaky CI `(*lead, C)` of every site of `target` on `batch` (NumPy, per site name)."""
    out = _ci_jit(params, target, batch, sigmoid)
    return {n: np.asarray(v) for n, v in out.items()}


def one_hot_ci(
    params, target, n_inputs: int, value: float = 0.75, sigmoid: str = "leaky_hard"
) -> dict[str, np.ndarray]:
    """CI `(n_inputs, C)` of every site on the one-hot inputs x = value * e_i, i < n_inputs.

    For targets whose input is a float feature vector of width `n_inputs`.
    """
    return batch_ci(params, target, value * jnp.eye(n_inputs, dtype=jnp.float32), sigmoid)


def _ci_masked_error_fn(params, target, batch, sigmoid: str):

    out, inputs = clean_forward(target, batch)
    ci = compute_ci(params, target, inputs, sigmoid).lower
    pred = masked_forward(params, target, batch, deterministic_masks(ci))
    return jnp.mean((pred - out) ** 2, axis=-1)


_ci_masked_error_jit = jax.jit(_ci_masked_error_fn, static_argnames="sigmoid")


def one_hot_recon_error(
    params, target, n_inputs: int, value: float = 0.75, sigmoid: str = "leaky_hard"
) -> np.ndarray:
    """Per input i, `mean_o (f(x | masks = CI, no delta) - f(x))_o^2` on x = value * e_i: `(n_inputs,)`.

    How well the subcomponents the CI function selects for feature i alone reproduce the target on it.
    """
    x = value * jnp.eye(n_inputs, dtype=jnp.float32)
    return np.asarray(_ci_masked_error_jit(params, target, x, sigmoid), np.float64)
