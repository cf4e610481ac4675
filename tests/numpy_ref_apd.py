"""Independent NumPy float64 references for APD (spec/apd.md), for a two-site tanh MLP target

    f(x) = tanh(x K1 + b1) K2 + b2,   sites "w1" (K1: (d0, d1)) and "w2" (K2: (d1, d2)),

written from the spec with explicit loops and per-example materialised weights, not from spdjax
code. Components: `A[l]: (C, d_in_l, m)`, `B[l]: (C, m, d_out_l)`, `P_{c,l} = A[l][c] @ B[l][c]`.
"""

from __future__ import annotations

import math

import numpy as np


def f64(x):
    return np.asarray(x, np.float64)


def comp_kernel(A, B, c):
    return f64(A)[c] @ f64(B)[c]


def forward(x, K1, b1, K2, b2):
    """Target output and the hidden (input of w2) for one example x: (d0,)."""
    h = np.tanh(x @ K1 + b1)
    return h @ K2 + b2, h


def masked_forward(x, mask, A, B, b1, b2):
    """One example: every site uses sum_c mask_c P_c (materialised per example)."""
    C = f64(A[0]).shape[0]
    W1 = sum(mask[c] * comp_kernel(A[0], B[0], c) for c in range(C))
    W2 = sum(mask[c] * comp_kernel(A[1], B[1], c) for c in range(C))
    return forward(x, W1, b1, W2, b2)


def faithfulness(K1, K2, A, B):
    C = f64(A[0]).shape[0]
    num = 0.0
    for K, Al, Bl in ((K1, A[0], B[0]), (K2, A[1], B[1])):
        S = sum(comp_kernel(Al, Bl, c) for c in range(C))
        num += np.sum((f64(K) - S) ** 2)
    return num / (f64(K1).size + f64(K2).size)


def gradient_attr(X, K1, b1, K2, b2, A, B):
    """attr[b, c] = sum_o (sum_l sum_j df_o/dh_{l,j} (x_l P_{c,l})_j)^2, analytic target derivatives."""
    X = f64(X)
    n, C = X.shape[0], f64(A[0]).shape[0]
    out = np.zeros((n, C))
    for b in range(n):
        x = X[b]
        pre = x @ K1 + b1
        h = np.tanh(pre)
        d2 = K2.shape[1]
        for c in range(C):
            a1 = x @ comp_kernel(A[0], B[0], c)
            a2 = h @ comp_kernel(A[1], B[1], c)
            tot = 0.0
            for o in range(d2):
                g1 = (1 - np.tanh(pre) ** 2) * K2[:, o]  # d f_o / d h1
                g2 = np.eye(d2)[o]  # d f_o / d h2
                tot += (g1 @ a1 + g2 @ a2) ** 2
            out[b, c] = tot
    return out


def activation_attr(X, K1, b1, A, B):
    X = f64(X)
    n, C = X.shape[0], f64(A[0]).shape[0]
    out = np.zeros((n, C))
    for b in range(n):
        h = np.tanh(X[b] @ K1 + b1)
        for c in range(C):
            out[b, c] = np.sum((X[b] @ comp_kernel(A[0], B[0], c)) ** 2) + np.sum((h @ comp_kernel(A[1], B[1], c)) ** 2)
    return out


def ablation_attr(X, b1, b2, A, B):
    X = f64(X)
    n, C = X.shape[0], f64(A[0]).shape[0]
    out = np.zeros((n, C))
    for b in range(n):
        full, _ = masked_forward(X[b], np.ones(C), A, B, b1, b2)
        for c in range(C):
            m = np.ones(C)
            m[c] = 0.0
            y, _ = masked_forward(X[b], m, A, B, b1, b2)
            out[b, c] = np.mean((full - y) ** 2)
    return out


def batch_topk(attr, k):
    """Keep floor(k * n) largest entries of the flattened (n, C) matrix; ties: lower flat index first."""
    attr = f64(attr)
    n_keep = int(math.floor(round(k * attr.shape[0], 9)))
    flat = attr.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
    mask = np.zeros(flat.size, bool)
    mask[order[:n_keep]] = True
    return mask.reshape(attr.shape)


def sample_topk(attr, k):
    attr = f64(attr)
    mask = np.zeros(attr.shape, bool)
    for b in range(attr.shape[0]):
        order = sorted(range(attr.shape[1]), key=lambda i: (-attr[b, i], i))
        mask[b, order[: int(k)]] = True
    return mask


def topk_recon_and_act(X, mask, K1, b1, K2, b2, A, B):
    X = f64(X)
    se_out, se_act, n_out, n_act = 0.0, 0.0, 0, 0
    for b in range(X.shape[0]):
        y, h = forward(X[b], K1, b1, K2, b2)
        yk, hk = masked_forward(X[b], mask[b].astype(float), A, B, b1, b2)
        se_out += np.sum((yk - y) ** 2)
        se_act += np.sum((hk - h) ** 2)
        n_out += y.size
        n_act += h.size
    return se_out / n_out, se_act / n_act


def schatten(mask, A, B, p, n_params):
    mask = f64(mask)
    n, C = mask.shape
    total = 0.0
    for b in range(n):
        for c in range(C):
            if mask[b, c] == 0:
                continue
            s = 0.0
            for Al, Bl in zip(A, B):
                Al, Bl = f64(Al), f64(Bl)
                for j in range(Al.shape[2]):
                    s += (np.sum(Al[c, :, j] ** 2) * np.sum(Bl[c, j, :] ** 2)) ** (p / 2)
            total += mask[b, c] * s
    return total / (n_params * n)


def lp_sparsity(attr, d_out, p):
    attr = f64(attr)
    return float(np.mean([sum(abs(attr[b, c] / d_out) ** (p / 2) for c in range(attr.shape[1])) for b in range(attr.shape[0])]))


def unit_norm(A):
    A = f64(A).copy()
    for c in range(A.shape[0]):
        for j in range(A.shape[2]):
            A[c, :, j] /= np.linalg.norm(A[c, :, j])
    return A


def project_radial(G, A_unit):
    G = f64(G).copy()
    for c in range(G.shape[0]):
        for j in range(G.shape[2]):
            a = A_unit[c, :, j]
            G[c, :, j] -= (G[c, :, j] @ a) * a
    return G
