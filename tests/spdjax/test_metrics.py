"""spdjax.metrics against independent float64 loop references and hand-made perfect / imperfect cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdjax import metrics
from spdjax.components import Components

# ----------------------------------------------------------------------------- references


def ref_mmcs_ml2r(kernel, V, U):
    """Loops over features j and subcomponents c, exactly as toy_models.md writes MMCS / ML2R."""
    kernel, V, U = (np.asarray(a, np.float64) for a in (kernel, V, U))
    d_in, C = V.shape
    coss, ratios = [], []
    for j in range(d_in):
        w = kernel[j]
        best_c, best_cos = None, -np.inf
        for c in range(C):
            col = V[j, c] * U[c]
            if np.linalg.norm(col) == 0:
                continue  # undefined cosine: not a candidate
            cos = col @ w / (np.linalg.norm(col) * np.linalg.norm(w))
            if cos > best_cos:
                best_c, best_cos = c, cos
        coss.append(best_cos)
        ratios.append(np.linalg.norm(V[j, best_c] * U[best_c]) / np.linalg.norm(w))
    return float(np.mean(coss)), float(np.mean(ratios))


def ref_n_alive(V, U, threshold):
    V, U = np.asarray(V, np.float64), np.asarray(U, np.float64)
    count = 0
    for c in range(V.shape[1]):
        s = sum(np.linalg.norm(U[c] * V[j, c]) for j in range(V.shape[0]))
        count += s > threshold
    return count


def ref_identity_error(ci, tol):
    """Brute force over every injective row -> column assignment (small matrices only)."""
    n, C = ci.shape
    best, best_cols = -np.inf, None
    for cols in itertools.permutations(range(C), n):
        s = sum(ci[i, cols[i]] for i in range(n))
        if s > best:
            best, best_cols = s, cols
    err = 0
    for i in range(n):
        for c in range(C):
            if c == best_cols[i]:
                err += ci[i, c] < 1 - tol
            else:
                err += ci[i, c] > tol
    return err


def ref_dense_error(ci, k, tol):
    mass = [ci[:, c].sum() for c in range(ci.shape[1])]
    order = sorted(range(ci.shape[1]), key=lambda c: -mass[c])
    err = 0
    for rank, c in enumerate(order):
        for i in range(ci.shape[0]):
            err += (ci[i, c] < 1 - tol) if rank < k else (ci[i, c] > tol)
    return err


def pentagon(n=5, radius=1.1):
    ang = 2 * np.pi * np.arange(n) / n + 0.3
    return radius * np.stack([np.cos(ang), np.sin(ang)])  # paper W: (n_hidden=2, n_features=n)


def perfect_comps(W, C=20, scale=1.0):
    """kernel = W^T (n_f, 2) split into one rank-one piece per feature; the other C - n_f are zero."""
    n_h, n_f = W.shape
    V = np.zeros((n_f, C))
    U = np.zeros((C, n_h))
    for j in range(n_f):
        V[j, j] = scale
        U[j] = W[:, j] / scale
    return Components(V=jnp.asarray(V, jnp.float32), U=jnp.asarray(U, jnp.float32))


# ----------------------------------------------------------------------------- MMCS / ML2R / n_alive


def test_mmcs_ml2r_matches_reference_on_random():
    rng = np.random.default_rng(0)
    for d_in, d_out, C in [(5, 2, 20), (40, 10, 7), (3, 4, 3)]:
        K = rng.normal(size=(d_in, d_out))
        V, U = rng.normal(size=(d_in, C)), rng.normal(size=(C, d_out))
        got = metrics.mmcs_ml2r(K, Components(V=V, U=U))
        np.testing.assert_allclose(got, ref_mmcs_ml2r(K, V, U), rtol=1e-10)


def test_perfect_pentagon_decomposition():
    W = pentagon()
    kernel = W.T
    for scale in (1.0, 3.0, -2.0):
        comps = perfect_comps(W, scale=scale)
        np.testing.assert_allclose(np.asarray(comps.V) @ np.asarray(comps.U), kernel, atol=1e-6)
        mmcs, ml2r = metrics.mmcs_ml2r(kernel, comps)
        assert mmcs == pytest.approx(1.0, abs=1e-6)
        assert ml2r == pytest.approx(1.0, abs=1e-6)
        assert metrics.n_alive(comps) == 5
        assert sorted(metrics.alive_indices(comps).tolist()) == [0, 1, 2, 3, 4]


def test_imperfect_decompositions():
    W = pentagon()
    kernel = W.T
    # feature 0 split into two equal halves: the direction is right, its best piece is half as long
    V = np.zeros((5, 20))
    U = np.zeros((20, 2))
    for j in range(5):
        V[j, j], U[j] = 1.0, W[:, j]
    V[0, 0], V[0, 5], U[5] = 0.5, 0.5, W[:, 0]
    comps = Components(V=V, U=U)
    mmcs, ml2r = metrics.mmcs_ml2r(kernel, comps)
    assert mmcs == pytest.approx(1.0)
    assert ml2r == pytest.approx((4 + 0.5) / 5)
    assert metrics.n_alive(comps) == 6
    # feature 1's piece rotated by 30 degrees and 1.2x longer
    th = np.pi / 6
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    V = np.eye(5, 20)
    U = np.zeros((20, 2))
    U[:5] = W.T
    U[1] = 1.2 * R @ W[:, 1]
    comps = Components(V=V, U=U)
    mmcs, ml2r = metrics.mmcs_ml2r(kernel, comps)
    assert mmcs == pytest.approx((4 + np.cos(th)) / 5)
    assert ml2r == pytest.approx((4 + 1.2) / 5)
    np.testing.assert_allclose((mmcs, ml2r), ref_mmcs_ml2r(kernel, V, U), rtol=1e-12)


def test_n_alive_matches_reference_and_threshold():
    rng = np.random.default_rng(1)
    V, U = rng.normal(size=(7, 30)) * 0.01, rng.normal(size=(30, 3)) * 0.5
    for thr in (0.0, 0.005, 0.017, 0.05):
        assert metrics.n_alive(Components(V=V, U=U), thr) == ref_n_alive(V, U, thr)
    # one feature-column of norm 0.01 each for 2 features: score 0.02 > 0.017; 0.016 is not
    V = np.zeros((4, 2))
    U = np.zeros((2, 2))
    V[:2, 0], U[0] = 1.0, [0.006, 0.008]  # ||U|| = 0.01, score 0.02
    V[0, 1], U[1] = 1.0, [0.016, 0.0]
    assert metrics.n_alive(Components(V=V, U=U)) == 1
    np.testing.assert_allclose(metrics.subcomponent_norms(Components(V=V, U=U)), [0.02, 0.016])


def test_alive_counts_by_ci_not_norm():
    """`n_alive/<site>` counts subcomponents with CI > 0.1 on some input (every site, the tied one
    included), `n_alive_norm/<site>` the norm count (primary sites): here they disagree on which and how
    many, so swapping the two keys fails."""
    from spdjax.sites import SiteSpec

    sites = (SiteSpec("a", "linear", (3,), (2,), 4, 3), SiteSpec("b", "linear", (2,), (3,), 4, 2, tied_to="a"))
    V, U = np.zeros((3, 4)), np.zeros((4, 2))
    V[0, 0], U[0] = 1.0, [1.0, 0.0]  # fires: alive both ways
    V[1, 1], U[1] = 1.0, [0.0, 1.0]  # large, never fires: alive by norm only
    V[2, 2], U[2] = 1.0, [0.05, 0.0]  # small correction (0.05 > 0.017), CI exactly 0.1: alive by norm only
    # subcomponent 3: zero norm, fires on one input: alive by CI only
    ci_a = np.zeros((50, 4))
    ci_a[::7, 0], ci_a[:, 2], ci_a[13, 3] = 0.9, 0.1, 0.2
    ci_b = np.zeros((5, 10, 4))  # (batch, positions, C): any input counts
    ci_b[3, 7, 1], ci_b[0, 0, 0] = 0.5, 0.7  # the tied site fires 1 and the shared 0
    comps = {"a": Components(V=V, U=U)}
    out = metrics.alive_counts(comps, sites, {"a": ci_a, "b": ci_b})
    # n_alive counts distinct subcomponents of the shared set: {0, 3} | {0, 1} = 3 (not 2 + 2)
    assert out == {"n_alive/a": 2, "n_alive/b": 2, "n_alive": 3, "n_alive_norm/a": 3, "n_alive_norm": 3}
    assert metrics.n_ci_active(ci_a) == 2 and metrics.n_alive(comps["a"]) == 3
    low = metrics.alive_counts(comps, sites, {"a": ci_a, "b": ci_b}, ci_threshold=0.05, norm_threshold=0.1)
    assert (low["n_alive/a"], low["n_alive_norm/a"]) == (3, 2)


def ref_liveness_gap(V, U):
    V, U = np.asarray(V, np.float64), np.asarray(U, np.float64)
    scores = [sum(np.linalg.norm(U[c] * V[j, c]) for j in range(V.shape[0])) for c in range(V.shape[1])]
    scores = sorted((max(x, np.finfo(np.float64).tiny) for x in scores), reverse=True)
    best_n, best_r = 1, -1.0
    for n in range(1, len(scores)):
        if scores[n - 1] / scores[n] > best_r:
            best_n, best_r = n, scores[n - 1] / scores[n]
    return best_n, best_r


def test_liveness_gap_matches_reference():
    rng = np.random.default_rng(4)
    # 5 real subcomponents (scale ~1) among 25 dead ones at the noise floor (~0.02, i.e. around 0.017)
    V = np.concatenate([rng.normal(size=(8, 5)), 0.003 * rng.normal(size=(8, 25))], axis=1)
    U = rng.normal(size=(30, 3)) * np.r_[np.ones(5), 0.3 * np.ones(25)][:, None]
    comps = Components(V=V, U=U)
    n, ratio = metrics.liveness_gap(comps)
    rn, rr = ref_liveness_gap(V, U)
    assert (n, ratio) == (rn, pytest.approx(rr, rel=1e-12))
    assert n == 5 and ratio > 10 and metrics.n_alive(comps) > 5  # the threshold count is fooled, the gap is not
    # exact zeros (a subcomponent pruned to 0) and the no-gap case
    V0 = np.zeros((3, 3)); V0[0, 0] = V0[1, 1] = 1.0
    U0 = np.zeros((3, 2)); U0[0, 0] = 2.0; U0[1, 0] = 1.0
    assert metrics.liveness_gap(Components(V=V0, U=U0))[0] == 2
    assert metrics.liveness_gap(Components(V=np.ones((2, 1)), U=np.ones((1, 2)))) == (1, 1.0)


# ----------------------------------------------------------------------------- CI-L0


def test_ci_l0():
    ci = np.array([[0.0, 0.2, 0.05, 1.0], [0.1, 0.1, 0.11, 0.0]])
    assert metrics.ci_l0(ci) == pytest.approx((2 + 1) / 2)
    assert metrics.ci_l0(ci, threshold=0.0) == pytest.approx((3 + 3) / 2)
    assert metrics.ci_l0(np.stack([ci, ci])) == pytest.approx(1.5)  # extra leading axes average too


def test_n_ci_active():
    ci = np.zeros((2, 3, 5))
    ci[0, 2, 1] = 0.5  # one input suffices
    ci[1, 0, 3] = 0.1  # not above the threshold
    ci[1, 1, 4] = 1.0
    assert metrics.n_ci_active(ci) == 2
    assert metrics.n_ci_active(ci, threshold=0.05) == 3
    assert metrics.n_ci_active(np.zeros((4, 7))) == 0


# ----------------------------------------------------------------------------- IdentityCIError


def test_identity_ci_error_perfect_permuted():
    rng = np.random.default_rng(2)
    n, C = 5, 20
    base = np.zeros((n, C))
    base[np.arange(n), np.arange(n)] = rng.uniform(0.95, 1.0, n)
    base += rng.uniform(0, 0.05, (n, C)) * (base == 0)
    perm = rng.permutation(C)
    ci = base[:, perm]
    assert metrics.identity_ci_error(ci, "identity") == 0
    permuted, p = metrics.permute_to_identity(ci)
    np.testing.assert_allclose(permuted[:, :n], base[:, :n])
    assert sorted(p.tolist()) == list(range(C))


def test_identity_ci_error_known_errors():
    n, C = 5, 8
    ci = np.zeros((n, C))
    ci[np.arange(n), [3, 0, 6, 1, 2]] = 1.0
    ci[2, 6] = 0.5  # a weak diagonal entry (still the best match): 1 error
    ci[0, 0] = 0.3  # an off-diagonal entry in a matched column: 1 error
    ci[4, 7] = 0.2  # an entry in an unmatched column: 1 error
    ci[1, 5] = 0.1  # exactly tol: not an error
    assert metrics.identity_ci_error(ci, "identity") == 3
    assert metrics.identity_ci_error(ci, "identity", tol=0.25) == 2
    # a feature with two full subcomponents: one is matched, the other is off-diagonal
    ci2 = np.zeros((n, C))
    ci2[np.arange(n), np.arange(n)] = 1.0
    ci2[3, 7] = 1.0
    assert metrics.identity_ci_error(ci2, "identity") == 1
    # a dead feature: diagonal 0 (1 error)
    ci2[4, 4] = 0.0
    assert metrics.identity_ci_error(ci2, "identity") == 2


def test_identity_ci_error_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n, C = rng.integers(2, 4), rng.integers(4, 6)
        ci = rng.uniform(0, 1, (n, C)) ** 3
        assert metrics.identity_ci_error(ci, "identity") == ref_identity_error(ci, 0.1)


def test_dense_ci_error():
    rng = np.random.default_rng(4)
    n, C, k = 6, 10, 2
    ci = rng.uniform(0, 0.05, (n, C))
    ci[:, [7, 2]] = rng.uniform(0.92, 1.0, (n, 2))
    assert metrics.identity_ci_error(ci, "dense", k=k) == 0
    ci[3, 7] = 0.5  # a dense subcomponent off on one input
    ci[1, 4] = 0.3  # a sparse subcomponent on
    assert metrics.identity_ci_error(ci, "dense", k=k) == 2
    assert metrics.identity_ci_error(ci, "dense", k=3) == 2 + (n - 1)  # col 4 is 3rd by mass
    for _ in range(20):
        ci = rng.uniform(0, 1, (4, 6)) ** 2
        for kk in (0, 1, 3):
            assert metrics.identity_ci_error(ci, "dense", k=kk) == ref_dense_error(ci, kk, 0.1)


def test_identity_ci_error_rejects_bad_input():
    with pytest.raises(ValueError, match="pattern"):
        metrics.identity_ci_error(np.zeros((3, 4)), "banana")
    with pytest.raises(ValueError, match="k"):
        metrics.identity_ci_error(np.zeros((3, 4)), "dense")
    with pytest.raises(ValueError, match="columns"):
        metrics.identity_ci_error(np.zeros((5, 4)), "identity")


# ----------------------------------------------------------------------------- CI on a target


def test_one_hot_ci_matches_loss_machinery():
    import spdjax
    from spdjax.losses import clean_forward, compute_ci

    def apply_fn(p, x):
        h = spdjax.targets.linear("w1", x, p["w1"])
        return jax.nn.relu(spdjax.targets.linear("w2", h, p["w2"], p["b"]))

    W = jnp.asarray(pentagon(), jnp.float32)
    params = {"w1": W.T, "w2": W, "b": -0.2 * jnp.ones(5)}
    target = spdjax.from_apply(apply_fn, params, {"w1": 6, "w2": 6}, tied={"w2": "w1"})
    sp = spdjax.init_decomposition(jax.random.PRNGKey(0), target)
    ci = metrics.one_hot_ci(sp, target, 5)
    assert set(ci) == {"w1", "w2"} and all(v.shape == (5, 6) for v in ci.values())
    _, inputs = clean_forward(target, 0.75 * jnp.eye(5))
    want = compute_ci(sp, target, inputs, "leaky_hard").lower
    for n in ci:
        np.testing.assert_allclose(ci[n], np.asarray(want[n]), rtol=1e-6)
        assert ci[n].min() >= 0 and ci[n].max() <= 1
