"""Independent NumPy float64 reference implementations of the SPD formulas.

Written from the method spec (/work/shared/spec/spd.md) and the documented contracts of the public
spdjax functions, deliberately *not* by calling or copying spdjax code: loops over subcomponents,
per-example materialised weights, explicit per-sample / per-site loops. Everything works in float64;
callers convert JAX arrays with `f64(...)`.

Layouts follow spdjax's public convention: a site's kernel is K = W^T with shape (d_in, d_out) and
y = a K + b; subcomponents V: (d_in, C), U: (C, d_out) with K ~ V U.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

LEAK = 0.01


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- sigmoids (spec §2)


def hard(z):
    z = f64(z)
    return np.minimum(np.maximum(z, 0.0), 1.0)


def hard_grad(z):
    """Derivative of clip(z, 0, 1) away from the kinks at 0 and 1."""
    z = f64(z)
    return ((z > 0.0) & (z < 1.0)).astype(np.float64)


def lower_leaky_hard(z):
    """Reference-main variant: forward is clip(z, 0, 1)."""
    return hard(z)


def lower_leaky_hard_vjp(z, ct):
    """Reference-main backward: ct on 0 < z <= 1; 0 above 1; 0.01 ct for z <= 0 only if ct < 0."""
    z, ct = f64(z), f64(ct)
    out = np.zeros_like(ct)
    for idx in np.ndindex(z.shape):
        zi, gi = z[idx], ct[idx]
        if 0.0 < zi <= 1.0:
            out[idx] = gi
        elif zi <= 0.0 and gi < 0.0:
            out[idx] = LEAK * gi
        else:
            out[idx] = 0.0
    return out


def lower_leaky_hard_paper(z):
    """Paper variant: 0.01 z below 0, z on [0, 1], 1 above 1."""
    z = f64(z)
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape):
        zi = z[idx]
        out[idx] = LEAK * zi if zi < 0.0 else (zi if zi <= 1.0 else 1.0)
    return out


def lower_leaky_hard_paper_grad(z):
    z = f64(z)
    return np.where(z < 0.0, LEAK, np.where(z < 1.0, 1.0, 0.0))


def upper_leaky_hard(z):
    """0 below 0, z on [0, 1], 1 + 0.01 (z - 1) above 1."""
    z = f64(z)
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape):
        zi = z[idx]
        out[idx] = 0.0 if zi < 0.0 else (zi if zi <= 1.0 else 1.0 + LEAK * (zi - 1.0))
    return out


def upper_leaky_hard_grad(z):
    z = f64(z)
    return np.where(z < 0.0, 0.0, np.where(z < 1.0, 1.0, LEAK))


def logistic(z):
    z = f64(z)
    return 1.0 / (1.0 + np.exp(-z))


def logistic_grad(z):
    s = logistic(z)
    return s * (1.0 - s)


# (lower, upper) per sigmoid name: lower makes the masks / CI-masked losses, upper feeds minimality.
SIGMOID_PAIRS = {
    "leaky_hard": (lower_leaky_hard, upper_leaky_hard),
    "leaky_hard_paper": (lower_leaky_hard_paper, upper_leaky_hard),
    "hard": (hard, hard),
    "logistic": (logistic, logistic),
}


# ----------------------------------------------------------------------------- CI functions (spec §2)


def gelu(x):
    """Exact (erf) GELU."""
    x = f64(x)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_grad(x):
    """d GELU / dx = Phi(x) + x phi(x)."""
    x = f64(x)
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def scalar_mlp_vjp(w1, b1, w2, h, dz):
    """VJP of z[n,c] = sum_k w2[c,k] GELU(w1[c,k] h[n,c] + b1[c,k]) + b2[c]: (dw1, db1, dw2, dh) for
    w1, b1, w2: (C, H), h, dz: (N, C)."""
    w1, b1, w2, h, dz = (f64(x) for x in (w1, b1, w2, h, dz))
    pre = h[..., None] * w1 + b1  # (N, C, H)
    g = dz[..., None] * w2 * gelu_grad(pre)
    return (g * h[..., None]).sum(0), g.sum(0), (gelu(pre) * dz[..., None]).sum(0), (g * w1).sum(-1)


def _mlp(layers, x):
    """Plain MLP on the last axis: GELU between layers, none after the last. layers: [(W, b)]."""
    for i, (w, b) in enumerate(layers):
        x = x @ f64(w) + f64(b)
        if i < len(layers) - 1:
            x = gelu(x)
    return x


def ci_raw(kind, weights, biases, a, V=None):
    """Raw importances z: (*lead, C) for a dense site input a: (*lead, d_in).

    mlp: per subcomponent c, MLP 1 -> hidden -> 1 on h_c = (a V)_c, weights[i][c]: (fan_in, fan_out).
    vector_mlp: per subcomponent c, MLP d_in -> hidden -> 1 on a.
    shared_mlp: one MLP d_in -> hidden -> C on a, weights[i]: (fan_in, fan_out).
    """
    a = f64(a)
    if kind == "shared_mlp":
        return _mlp(list(zip(weights, biases)), a)
    C = f64(weights[-1]).shape[0]
    outs = []
    for c in range(C):
        layers = [(f64(w)[c], f64(b)[c]) for w, b in zip(weights, biases)]
        if kind == "mlp":
            x = (a @ f64(V))[..., c : c + 1]
        elif kind == "vector_mlp":
            x = a
        else:
            raise ValueError(kind)
        outs.append(_mlp(layers, x)[..., 0])
    return np.stack(outs, axis=-1)


# ----------------------------------------------------------------------------- components (spec §1, §4)


def materialised_kernel(V, U, m, m_delta=None, K=None):
    """Per-example kernel V diag(m) U + m_delta (K - V U): (*lead, d_in, d_out), by explicit loops."""
    V, U, m = f64(V), f64(U), f64(m)
    lead = m.shape[:-1]
    out = np.zeros(lead + (V.shape[0], U.shape[1]))
    for idx in np.ndindex(lead):
        W = V @ np.diag(m[idx]) @ U
        if m_delta is not None:
            W = W + f64(m_delta)[idx] * (f64(K) - V @ U)
        out[idx] = W
    return out


def masked_site_output(a, V, U, m, m_delta=None, K=None, b=None):
    """y' = a W'(x, r)^T + b, computed per example from the materialised kernel (spec §4)."""
    a = f64(a)
    Wp = materialised_kernel(V, U, m, m_delta, K)
    y = np.einsum("...i,...io->...o", a, Wp)
    return y if b is None else y + f64(b)


def masked_site_output_factored(a, V, U, m, m_delta=None, K=None, b=None):
    """The folded form ((a V) * (m - m_delta)) U + m_delta (a K) + b."""
    a, V, U, m = f64(a), f64(V), f64(U), f64(m)
    h = a @ V
    if m_delta is None:
        y = (h * m) @ U
    else:
        md = f64(m_delta)[..., None]
        y = (h * (m - md)) @ U + md * (a @ f64(K))
    return y if b is None else y + f64(b)


def faithfulness(pairs):
    """sum_l ||K_l - V_l U_l||_F^2 / sum_l numel(K_l) over (K, V, U) of *distinct* parameters."""
    num, den = 0.0, 0
    for K, V, U in pairs:
        R = f64(K) - f64(V) @ f64(U)
        num += float(np.sum(R * R))
        den += R.size
    return num / den


# ----------------------------------------------------------------------------- losses (spec §5)


def mse(pred, target):
    d = f64(pred) - f64(target)
    return float(np.mean(d * d))


def log_softmax(x):
    x = f64(x)
    mx = np.max(x, axis=-1, keepdims=True)
    return x - mx - np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))


def kl(pred, target):
    """KL(softmax(target) || softmax(pred)) summed over the last axis, averaged over the others."""
    lt, lp = log_softmax(target), log_softmax(pred)
    per_pos = np.sum(np.exp(lt) * (lt - lp), axis=-1)
    return float(np.mean(per_pos))


def divergence(kind, pred, target):
    return {"mse": mse, "kl": kl}[kind](pred, target)


def importance_minimality(ci_upper, p, beta=0.0, eps=1e-12):
    """sum_l sum_c [mean_{b,t} (g + eps)^p + beta * mean * log2(1 + sum_{b,t} (g + eps)^p)]."""
    total = 0.0
    for g in ci_upper:
        g = f64(g)
        C = g.shape[-1]
        flat = g.reshape(-1, C)
        for c in range(C):
            x = (flat[:, c] + eps) ** p
            s = float(np.sum(x))
            mean = s / x.shape[0]
            total += mean + beta * mean * math.log2(1.0 + s)
    return total


def annealed_p(progress, p0, p1=None, start=1.0, end=1.0):
    """p0 before `start`, p1 from `end` on, linear in between (constant p0 if p1 is None).

    Tie-break as the reference: progress < start gives p0, else progress >= end gives p1.
    """
    if p1 is None or start >= 1.0:
        return p0
    if progress < start:
        return p0
    if progress >= end:
        return p1
    return p0 + (p1 - p0) * (progress - start) / (end - start)


def ci_l0(ci_lower, threshold):
    """Mean over positions of the number of subcomponents with CI > threshold."""
    g = f64(ci_lower)
    return float(np.mean(np.sum(g > threshold, axis=-1)))


# ----------------------------------------------------------------------------- a small MLP target


def mlp_forward(x, layers, act=np.tanh, site_masks=None):
    """Forward of a stack of linear layers with `act` between them (none after the last).

    layers: [(K (d_in, d_out), b)] per site. site_masks: {layer index: (m, m_delta or None, V, U)};
    masked layers compute `masked_site_output`, the others the clean a K + b.
    """
    h = f64(x)
    site_masks = site_masks or {}
    for i, (K, b) in enumerate(layers):
        if i in site_masks:
            m, md, V, U = site_masks[i]
            h = masked_site_output(h, V, U, m, md, K, b)
        else:
            h = h @ f64(K) + f64(b)
        if i < len(layers) - 1:
            h = act(h)
    return h


def site_inputs(x, layers, act=np.tanh):
    """Clean input of every layer."""
    h, out = f64(x), []
    for i, (K, b) in enumerate(layers):
        out.append(h)
        h = h @ f64(K) + f64(b)
        if i < len(layers) - 1:
            h = act(h)
    return out


def stochastic_recon(x, layers, comps, masks, kind="mse", act=np.tanh):
    """(1/S) sum_s D(f(x | all sites masked with m^(s)), f(x)).

    comps: [(V, U)] per layer; masks: [(m (S, *lead, C), m_delta (S, *lead) or None)] per layer.
    """
    out = mlp_forward(x, layers, act)
    S = f64(masks[0][0]).shape[0]
    total = 0.0
    for s in range(S):
        sm = {
            i: (f64(m)[s], None if md is None else f64(md)[s], comps[i][0], comps[i][1])
            for i, (m, md) in enumerate(masks)
        }
        total += divergence(kind, mlp_forward(x, layers, act, sm), out)
    return total / S


def stochastic_recon_layerwise(x, layers, comps, masks, kind="mse", act=np.tanh):
    """(1/(S L)) sum_s sum_l D(f(x | only site l masked with m^(s)_l), f(x))."""
    out = mlp_forward(x, layers, act)
    S, L = f64(masks[0][0]).shape[0], len(masks)
    total = 0.0
    for s in range(S):
        for l, (m, md) in enumerate(masks):
            sm = {l: (f64(m)[s], None if md is None else f64(md)[s], comps[l][0], comps[l][1])}
            total += divergence(kind, mlp_forward(x, layers, act, sm), out)
    return total / (S * L)


# ----------------------------------------------------------------------------- subset, PGD, hidden acts


def _forward_positions(x, layers, site_state, act=np.tanh):
    """Forward one position at a time; `site_state(i, pos) -> (m, md, V, U) or None` (None: clean)."""
    x = f64(x)
    lead = x.shape[:-1]
    out = None
    for pos in np.ndindex(lead):
        h = x[pos]
        for i, (K, b) in enumerate(layers):
            st = site_state(i, pos)
            if st is None:
                h = h @ f64(K) + f64(b)
            else:
                m, md, V, U = st
                W = materialised_kernel(V, U, m, md, K)  # (d_in, d_out) for this one position
                h = h @ W + f64(b)
            if i < len(layers) - 1:
                h = act(h)
        if out is None:
            out = np.zeros(lead + h.shape)
        out[pos] = h
    return out


def subset_recon(x, layers, comps, masks, routes, kind="mse", act=np.tanh):
    """(1/S) sum_s D(f(x | at each position only the routed sites masked), f(x)).

    masks: [(m (S, *lead, C), m_delta (S, *lead) or None)] per layer; routes: [bool (S, *lead)].
    """
    out = mlp_forward(x, layers, act)
    S = f64(masks[0][0]).shape[0]
    total = 0.0
    for s in range(S):
        def state(i, pos, s=s):
            if not routes[i][s][pos]:
                return None
            m, md = masks[i]
            return f64(m)[s][pos], None if md is None else f64(md)[s][pos], comps[i][0], comps[i][1]

        total += divergence(kind, _forward_positions(x, layers, state, act), out)
    return total / S


def pgd_recon(x, layers, comps, ci, init, n_steps, step_size, shared, only=None, routes=None,
              kind="mse", act=np.tanh, fd_eps=1e-6):
    """PGD adversarial recon: a <- clip(a + step sign(dD/da), 0, 1), gradients by central differences.

    ci: [g (*lead, C)] per layer; init: {layer: (a, a_delta or None)}, shapes (*lead, C)/(*lead) per
    example or (C,)/() shared; only: a layer index (only that layer masked); routes: [bool (*lead)].
    Returns (loss at the final sources, final sources {layer: (a, a_delta)}).
    """
    out = mlp_forward(x, layers, act)
    used = sorted(init) if only is None else [only]
    parts = [(i, j) for i in used for j in range(2) if init[i][j] is not None]
    shapes = {ij: np.shape(init[ij[0]][ij[1]]) for ij in parts}

    def unflat(theta):
        src, k = {i: [None, None] for i in used}, 0
        for ij in parts:
            n = int(np.prod(shapes[ij]))
            src[ij[0]][ij[1]] = theta[k:k + n].reshape(shapes[ij])
            k += n
        return src

    def loss(theta):
        src = unflat(theta)

        def state(i, pos):
            if i not in src or (routes is not None and not routes[i][pos]):
                return None
            a, ad = src[i]
            g = f64(ci[i])[pos]
            m = g + (1 - g) * (a if shared else a[pos])
            md = None if ad is None else (ad if shared else ad[pos])
            if routes is not None and md is None:
                md = 0.0
            return m, md, comps[i][0], comps[i][1]

        return divergence(kind, _forward_positions(x, layers, state, act), out)

    theta = np.concatenate([f64(init[i][j]).ravel() for i, j in parts])
    for _ in range(n_steps):
        grad = np.zeros_like(theta)
        for k in range(theta.size):
            e = np.zeros_like(theta)
            e[k] = fd_eps
            grad[k] = (loss(theta + e) - loss(theta - e)) / (2 * fd_eps)
        theta = np.clip(theta + step_size * np.sign(grad), 0.0, 1.0)
    return loss(theta), unflat(theta)


def hidden_acts_recon(x, layers, comps, masks, act=np.tanh):
    """sum_l ||a'_l - a_l||^2 / sum_l numel(a_l), a'_l the inputs of the all-sites-masked forward.

    masks: [(m (*lead, C), m_delta (*lead) or None)] per layer.
    """
    clean = site_inputs(x, layers, act)
    h, num, den = f64(x), 0.0, 0
    for i, (K, b) in enumerate(layers):
        num += np.sum((h - clean[i]) ** 2)
        den += clean[i].size
        m, md = masks[i]
        h = masked_site_output(h, comps[i][0], comps[i][1], f64(m), None if md is None else f64(md), K, b)
        if i < len(layers) - 1:
            h = act(h)
    return num / den
