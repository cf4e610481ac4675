"""APD (spdjax.apd): every loss and attribution against the NumPy float64 reference (numpy_ref_apd),
gradient attributions against brute-force per-sample parameter gradients, top-k semantics, the
unit-norm projection, check_grads of the loss, and a smoke launch of each APD config."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref_apd as ref  # tests/ is on sys.path
import pytest
from jax.test_util import check_grads

import spdjax
from spdjax.apd import attributions as attr_lib
from spdjax.apd import topk as topk_lib
from spdjax.apd.components import APDComponents, APDParams, site_components
from spdjax.apd.forward import clean_forward, masked_forward
from spdjax.apd.losses import TERMS, APDConfig, apd_loss_fn
from spdjax.apd.method import normalize_A, project_A_grads
from spdjax.config import load_config_file
from spdjax.optim import OptimConfig, make_schedule
from spdjax.targets.pure import linear

ROOT = Path(__file__).resolve().parents[3]
D0, D1, D2, C, M, NB = 3, 4, 2, 3, 2, 5
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _apply(params, x):
    h = jnp.tanh(linear("w1", x, params["w1"], params["b1"]))
    return linear("w2", h, params["w2"], params["b2"])


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    p = dict(
        w1=rng.normal(size=(D0, D1)), b1=0.3 * rng.normal(size=D1), w2=rng.normal(size=(D1, D2)),
        b2=0.3 * rng.normal(size=D2),
    )
    A = [rng.normal(size=(C, D0, M)), rng.normal(size=(C, D1, M))]
    B = [rng.normal(size=(C, M, D1)), rng.normal(size=(C, M, D2))]
    X = rng.normal(size=(NB, D0))
    return p, A, B, X


def _jax(p, A, B, X):
    target = spdjax.from_apply(_apply, {k: jnp.asarray(v) for k, v in p.items()}, sites={"w1": C, "w2": C})
    params = APDParams({
        "w1": APDComponents(jnp.asarray(A[0]), jnp.asarray(B[0])),
        "w2": APDComponents(jnp.asarray(A[1]), jnp.asarray(B[1])),
    })
    return target, params, jnp.asarray(X)


# ----------------------------------------------------------------------------- forward, faithfulness


def test_masked_forward_and_faithfulness(x64):
    p, A, B, X = _problem()
    target, params, x = _jax(p, A, B, X)
    mask = np.random.default_rng(1).uniform(size=(NB, C))
    got = np.asarray(masked_forward(params, target, x, jnp.asarray(mask)))
    want = np.stack([ref.masked_forward(X[b], mask[b], A, B, p["b1"], p["b2"])[0] for b in range(NB)])
    np.testing.assert_allclose(got, want, **TOL)
    full = np.asarray(masked_forward(params, target, x, None))
    want_full = np.stack([ref.masked_forward(X[b], np.ones(C), A, B, p["b1"], p["b2"])[0] for b in range(NB)])
    np.testing.assert_allclose(full, want_full, **TOL)
    cfg = APDConfig(C=C, coeffs=(("faithfulness", 1.0),), topk=None)
    loss, _ = apd_loss_fn(params, target, x, None, cfg)
    np.testing.assert_allclose(float(loss), ref.faithfulness(p["w1"], p["w2"], A, B), **TOL)


def test_masked_forward_sequence_axis(x64):
    """Leading axes stay general: (batch, positions, d) gives the per-position results."""
    p, A, B, X = _problem()
    target, params, _ = _jax(p, A, B, X)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, D0)))
    mask = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 3, C)))
    got = masked_forward(params, target, x, mask)
    flat = masked_forward(params, target, x.reshape(6, D0), mask.reshape(6, C))
    np.testing.assert_allclose(np.asarray(got).reshape(6, D2), np.asarray(flat), **TOL)
    for kind in attr_lib.ATTRIBUTIONS:
        _, inputs = clean_forward(target, x)
        a = attr_lib.attributions(kind, params, target, x, inputs)
        _, inputs_f = clean_forward(target, x.reshape(6, D0))
        b = attr_lib.attributions(kind, params, target, x.reshape(6, D0), inputs_f)
        np.testing.assert_allclose(np.asarray(a).reshape(6, C), np.asarray(b), **TOL)


# ----------------------------------------------------------------------------- attributions


@pytest.mark.parametrize("kind", attr_lib.ATTRIBUTIONS)
def test_attributions_match_reference(x64, kind):
    p, A, B, X = _problem()
    target, params, x = _jax(p, A, B, X)
    _, inputs = clean_forward(target, x)
    got = np.asarray(attr_lib.attributions(kind, params, target, x, inputs))
    if kind == "gradient":
        want = ref.gradient_attr(X, p["w1"], p["b1"], p["w2"], p["b2"], A, B)
    elif kind == "activation":
        want = ref.activation_attr(X, p["w1"], p["b1"], A, B)
    else:
        want = ref.ablation_attr(X, p["b1"], p["b2"], A, B)
    np.testing.assert_allclose(got, want, **TOL)


def _brute_force_gradient_attr(f_of_kernels, kernels, X, P):
    """attr[b, c] = sum_o (sum_l <d f_o(x_b) / d W_l, P_{c,l}>)^2, one jax.grad per sample and output."""
    n, d_out = X.shape[0], f_of_kernels(kernels, X[0]).shape[-1]
    Cn = next(iter(P.values())).shape[0]
    out = np.zeros((n, Cn))
    for b in range(n):
        for o in range(d_out):
            g = jax.grad(lambda ks: f_of_kernels(ks, X[b])[o])(kernels)
            for c in range(Cn):
                out[b, c] += float(sum(jnp.sum(g[l] * P[l][c]) for l in kernels)) ** 2
    return out


def test_gradient_attr_brute_force_mlp(x64):
    p, A, B, X = _problem(4)
    target, params, x = _jax(p, A, B, X)
    _, inputs = clean_forward(target, x)
    got = np.asarray(attr_lib.gradient_attributions(params, target, x, inputs))

    def f(ks, xb):
        return jnp.tanh(xb @ ks["w1"] + p["b1"]) @ ks["w2"] + p["b2"]

    P = {n: np.asarray(c.kernels()) for n, c in params.components.items()}
    want = _brute_force_gradient_attr(f, {"w1": jnp.asarray(p["w1"]), "w2": jnp.asarray(p["w2"])}, x, P)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_gradient_attr_brute_force_tied_tms(x64):
    """TMS (nnx, linear2 tied to linear1): the tied site's component is P_c^T."""
    from experiments.tms.model import tms_from_weights

    rng = np.random.default_rng(5)
    W, b = (a.astype(np.float32).astype(np.float64) for a in (rng.normal(size=(2, 5)), 0.1 * rng.normal(size=5)))
    model = tms_from_weights(W, b)
    target = spdjax.from_nnx(model, sites={"linear1": 4, "linear2": 4}, tied={"linear2": "linear1"})
    target = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), target)
    A1, B1 = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 3, 2))
    params = APDParams({"linear1": APDComponents(jnp.asarray(A1), jnp.asarray(B1))})
    x = jnp.asarray(rng.uniform(size=(4, 5)) * (rng.uniform(size=(4, 5)) < 0.5))
    x = x.at[:, 0].set(0.6)
    _, inputs = clean_forward(target, x)
    got = np.asarray(attr_lib.gradient_attributions(params, target, x, inputs))

    def f(ks, xb):
        return jax.nn.relu((xb @ ks["linear1"]) @ ks["linear2"] + b)

    P1 = np.einsum("cim,cmo->cio", A1, B1)
    P = {"linear1": P1, "linear2": np.swapaxes(P1, 1, 2)}
    kernels = {"linear1": jnp.asarray(W.T), "linear2": jnp.asarray(W)}
    want = _brute_force_gradient_attr(f, kernels, x, P)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    tied = site_components(params, target.site("linear2"))
    np.testing.assert_allclose(np.asarray(tied.kernels()), P["linear2"], **TOL)


# ----------------------------------------------------------------------------- top-k


def test_batch_topk_count_and_reference():
    rng = np.random.default_rng(0)
    for n, k in ((100, 0.29), (2048, 0.211), (256, 1.28), (7, 0.1), (5, 3.0)):
        a = rng.uniform(size=(n, 6))
        mask = np.asarray(topk_lib.batch_topk_mask(jnp.asarray(a), k))
        assert mask.sum() == min(math.floor(round(k * n, 9)), a.size), (n, k)
        np.testing.assert_array_equal(mask, ref.batch_topk(a, k))
    assert topk_lib.batch_topk_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    mask = np.asarray(topk_lib.batch_topk_mask(jnp.asarray(rng.uniform(size=(10, 3))), 0.05))
    assert mask.sum() == 0  # floor(0.5) = 0: nothing kept


def test_batch_topk_samples_may_use_zero_or_many():
    a = np.zeros((4, 3))
    a[0] = [5.0, 4.0, 3.0]
    mask = np.asarray(topk_lib.batch_topk_mask(jnp.asarray(a), 0.75))  # keep 3 of 12
    np.testing.assert_array_equal(mask.sum(axis=1), [3, 0, 0, 0])


def test_topk_ties_keep_exact_count_lower_index_first():
    a = jnp.ones((3, 4))
    mask = np.asarray(topk_lib.batch_topk_mask(a, 1.0))  # keep 3 of 12 equal values
    assert mask.sum() == 3
    np.testing.assert_array_equal(mask.reshape(-1), [True] * 3 + [False] * 9)
    np.testing.assert_array_equal(mask, ref.batch_topk(np.ones((3, 4)), 1.0))
    ms = np.asarray(topk_lib.sample_topk_mask(jnp.asarray([[1.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]]), 2))
    np.testing.assert_array_equal(ms, [[False, True, True, False], [True, True, False, False]])


def test_sample_topk_reference():
    a = np.random.default_rng(1).uniform(size=(6, 5))
    for k in (1, 2, 5):
        m = np.asarray(topk_lib.sample_topk_mask(jnp.asarray(a), k))
        assert (m.sum(axis=1) == k).all()
        np.testing.assert_array_equal(m, ref.sample_topk(a, k))
    with pytest.raises(ValueError, match="whole number"):
        topk_lib.sample_topk_mask(jnp.asarray(a), 1.5)


def test_no_gradient_through_selection(x64):
    """The loss gradient equals the gradient with the selected mask held fixed."""
    p, A, B, X = _problem(6)
    target, params, x = _jax(p, A, B, X)
    cfg = APDConfig(C=C, topk=0.6, coeffs=(("topk_recon", 1.0), ("schatten", 0.5)))
    g = jax.grad(lambda q: apd_loss_fn(q, target, x, None, cfg)[0])(params)
    _, inputs = clean_forward(target, x)
    mask = topk_lib.topk_mask(attr_lib.gradient_attributions(params, target, x, inputs), 0.6).astype(x.dtype)

    def fixed(q):
        pred = masked_forward(q, target, x, mask)
        from spdjax.apd.losses import schatten_loss

        return jnp.mean((pred - target(x)) ** 2) + 0.5 * schatten_loss(q, mask, D0 * D1 + D1 * D2, 1.0)

    g2 = jax.grad(fixed)(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("batch_topk,k", [(True, 0.8), (False, 2.0)], ids=["batch_topk", "sample_topk"])
@pytest.mark.parametrize("p_s", [1.0, 0.9])
def test_loss_terms_match_reference(x64, batch_topk, k, p_s):
    p, A, B, X = _problem(7)
    target, params, x = _jax(p, A, B, X)
    cfg = APDConfig(
        C=C, topk=k, batch_topk=batch_topk, schatten_p=p_s, lp_p=0.9,
        coeffs=(("faithfulness", 1.0), ("topk_recon", 2.0), ("act_recon", 0.5), ("schatten", 0.7), ("lp_sparsity", 0.3)),
    )
    loss, m = apd_loss_fn(params, target, x, None, cfg)
    attr = ref.gradient_attr(X, p["w1"], p["b1"], p["w2"], p["b2"], A, B)
    mask = ref.batch_topk(attr, k) if batch_topk else ref.sample_topk(attr, k)
    recon, act = ref.topk_recon_and_act(X, mask, p["w1"], p["b1"], p["w2"], p["b2"], A, B)
    want = dict(
        faithfulness=ref.faithfulness(p["w1"], p["w2"], A, B),
        topk_recon=recon,
        act_recon=act,
        schatten=ref.schatten(mask, A, B, p_s, D0 * D1 + D1 * D2),
        lp_sparsity=ref.lp_sparsity(attr, D2, 0.9),
    )
    for name, v in want.items():
        np.testing.assert_allclose(float(m[f"loss/{name}"]), v, rtol=1e-9, atol=1e-12, err_msg=name)
    total = sum(c * want[n] for n, c in cfg.coeffs)
    np.testing.assert_allclose(float(loss), total, rtol=1e-9)
    np.testing.assert_allclose(float(m["topk/l0"]), mask.sum(axis=1).mean(), **TOL)


@pytest.mark.parametrize("attribution", ["gradient", "activation"])
def test_check_grads_apd_loss_x64(x64, attribution):
    p, A, B, X = _problem(8)
    target, params, x = _jax(p, A, B, X)
    cfg = APDConfig(
        C=C, topk=0.8, attribution=attribution, schatten_p=0.9, lp_p=1.0,
        coeffs=(("faithfulness", 1.0), ("topk_recon", 1.0), ("act_recon", 1.0), ("schatten", 0.5), ("lp_sparsity", 0.1)),
    )
    check_grads(lambda q: apd_loss_fn(q, target, x, None, cfg)[0], (params,), order=1, modes=("rev",), eps=1e-6)


def test_apd_loss_fn_jits():
    p, A, B, X = _problem(9)
    target, params, x = _jax({k: v.astype(np.float32) for k, v in p.items()}, A, B, X)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    cfg = APDConfig(C=C, topk=0.8)
    loss, m = jax.jit(apd_loss_fn, static_argnames=())(params, target, x.astype(jnp.float32), None, cfg)
    loss2, _ = apd_loss_fn(params, target, x.astype(jnp.float32), None, cfg)
    np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-5)
    assert set(f"loss/{t}" for t, _ in cfg.coeffs) <= set(m)
    _, m = apd_loss_fn(params, target, x.astype(jnp.float32), None, cfg, TERMS)
    assert all(f"loss/{t}" in m for t in TERMS)


# ----------------------------------------------------------------------------- unit norm, schedule


def test_unit_norm_and_projection(x64):
    rng = np.random.default_rng(10)
    A, B, G = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 5, 2))
    params = APDParams({"s": APDComponents(jnp.asarray(A), jnp.asarray(B))})
    unit = normalize_A(params)
    np.testing.assert_allclose(np.asarray(unit.components["s"].A), ref.unit_norm(A), **TOL)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(unit.components["s"].A), axis=1), 1.0, **TOL)
    np.testing.assert_array_equal(np.asarray(unit.components["s"].B), B)
    grads = APDParams({"s": APDComponents(jnp.asarray(G), jnp.asarray(B))})
    proj = project_A_grads(grads, unit).components["s"]
    np.testing.assert_allclose(np.asarray(proj.A), ref.project_radial(G, ref.unit_norm(A)), **TOL)
    radial = np.sum(np.asarray(proj.A) * ref.unit_norm(A), axis=1)
    np.testing.assert_allclose(radial, 0.0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(proj.B), B)


@pytest.mark.parametrize("coeff", [-1.0, float("nan"), float("inf")])
def test_coeffs_must_be_finite_and_non_negative(coeff):
    from spdjax.config import parse

    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.apd.coeffs.schatten = coeff
    with pytest.raises(ValueError) as e:
        parse(cfg)
    assert str(e.value) == f"config.apd.coeffs.schatten must be finite and >= 0, got {coeff!r}"
    with pytest.raises(ValueError, match=r"^apd\.coeffs\.topk_recon must be a finite number >= 0"):
        APDConfig(C=3, coeffs=(("faithfulness", 1.0), ("topk_recon", coeff)))
    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.apd.coeffs.schatten = 0.0  # 0 leaves the term out
    assert "schatten" not in dict(parse(cfg).method.settings.apd.coeffs)


def test_schedule():
    s = make_schedule(OptimConfig(steps=101, lr=2.0, schedule="apd_cosine", warmup_frac=0.1, faithfulness_warmup_steps=0))
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 50, 100)],
                               [0.0, 1.0, 2.0 * math.cos(math.pi / 4), 2.0 * math.cos(math.pi / 4), 0.0][:2]
                               + [2.0 * math.cos(0.5 * math.pi * 10 / 100), 2.0 * math.cos(0.5 * math.pi * 0.5), 0.0],
                               atol=1e-6)
    for kind in ("apd_cosine", "apd_linear"):  # never negative, also at and past the last step
        f = make_schedule(OptimConfig(steps=20_000, lr=1e-3, schedule=kind, warmup_frac=0.05, faithfulness_warmup_steps=0))
        assert min(float(f(t)) for t in (19_998, 19_999, 20_000, 20_001)) >= 0.0
    c = make_schedule(OptimConfig(steps=20, lr=3e-2, schedule="constant", warmup_frac=0.05, faithfulness_warmup_steps=0))
    np.testing.assert_allclose([float(c(t)) for t in (0, 1, 19)], [0.0, 3e-2, 3e-2], rtol=1e-6)


# ----------------------------------------------------------------------------- configs and launches


def _load_config(name: str, arg: str):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


def test_config_errors():
    from spdjax.config import parse

    def apd(name, arg=None):
        return parse(_load_config(name, arg)).method.settings.apd

    cfg = _load_config("apd_tms_5-2", "smoke")
    rc = parse(cfg)
    assert rc.method.name == "apd" and rc.method.settings.apd.C == 5
    cfg.method = "xyz"
    with pytest.raises(ValueError, match="config.method"):
        parse(cfg)
    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.apd.attribution = "nope"
    with pytest.raises(ValueError, match="apd.attribution"):
        parse(cfg)
    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.optim.faithfulness_warmup_steps = 10
    with pytest.raises(ValueError, match="faithfulness_warmup_steps must be 0 for APD"):
        parse(cfg)
    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.loss = {}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['loss'\] for method 'apd' \(\['loss'\] belong to another method\)"):
        parse(cfg)
    full = apd("apd_tms_40-10")
    assert (full.C, full.m, full.topk, full.schatten_p) == (50, 11, 1.0, 0.9)
    r1 = apd("apd_resid_mlp", "1")
    assert (r1.C, r1.m, r1.unit_norm_A, r1.init_scale) == (130, 50, True, 2.0)
    tuned = apd("apd_resid_mlp", "1,tuned")
    assert (tuned.init_scale, dict(tuned.coeffs)["schatten"], dict(r1.coeffs)["schatten"]) == (1.0, 20.0, 10.0)
    assert dataclasses.replace(tuned, init_scale=2.0, coeffs=r1.coeffs) == r1
    with pytest.raises(ValueError, match="no tuned recipe"):
        _load_config("apd_resid_mlp", "2,tuned")
    assert (full.init_type, r1.init_type) == ("xavier_normal", "kaiming_uniform")
    cfg = _load_config("apd_tms_5-2", "smoke")
    cfg.apd.init_type = "orthogonal"
    with pytest.raises(ValueError, match="apd.init_type"):
        parse(cfg)


def _ownership_loop(attr, share=0.5):
    """Plain-loop reference of the one-hot ownership rules (float64)."""
    n, _ = attr.shape
    best = [max(range(attr.shape[1]), key=lambda c: (attr[i, c], -c)) for i in range(n)]
    own, split, shared = [], [], {}
    for i in range(n):
        tot = sum(float(a) for a in attr[i])
        frac = float(attr[i, best[i]]) / tot if tot > 0 else 0.0
        others = [j for j in range(n) if best[j] == best[i]]
        if len(others) > 1:
            shared[best[i]] = others
        elif frac >= share:
            own.append(i)
        else:
            split.append(i)
    return own, split, shared


def test_ownership():
    from spdjax.apd.analysis import n_features_with_own_component, ownership

    attr = np.array([
        [0.9, 0.1, 0.0, 0.0, 0.0],  # own: comp 0 with 90%
        [0.0, 0.6, 0.4, 0.0, 0.0],  # shares comp 1 with feature 2
        [0.0, 0.7, 0.0, 0.3, 0.0],
        [0.0, 0.0, 0.25, 0.4, 0.35],  # comp 3 is its alone but holds 40%: split
        [0.0, 0.0, 0.0, 0.0, 0.0],  # no attribution at all: best comp 0 (argmax), shared with feature 0
    ])
    o = ownership(attr)
    assert o["best"] == [0, 1, 1, 3, 0]
    assert o["own"] == [] and o["split"] == [3] and o["shared"] == {0: [0, 4], 1: [1, 2]}
    np.testing.assert_allclose(o["frac"], [0.9, 0.6, 0.7, 0.4, 0.0])
    o = ownership(attr[:4])
    assert o["own"] == [0] and o["split"] == [3] and o["shared"] == {1: [1, 2]}
    rng = np.random.default_rng(0)
    for trial in range(20):
        a = rng.exponential(size=(12, 9)) ** 4  # heavy-tailed: some owned, some shared, some split
        own, split, shared = _ownership_loop(a)
        o = ownership(a)
        assert (o["own"], o["split"], o["shared"]) == (own, split, shared), trial
        assert n_features_with_own_component(a) == len(own)
        assert sorted(own + split + [f for fs in shared.values() for f in fs]) == list(range(12))


@pytest.mark.parametrize("topk,batch_topk", [(0.2, True), (1, False), (None, True)])
def test_n_alive_counts_selected_components(topk, batch_topk):
    """APD `n_alive`: components selected on some held-out input (the run's top-k; without top-k,
    attribution >= 0.1 of the position's largest), `n_alive_norm` the norm count. Component 2 is scaled
    down: alive by norm, never selected, so swapping the two keys fails."""
    from spdjax.apd import analysis

    p, A, B, _ = _problem()
    A[0][2] *= 0.01
    A[1][2] *= 0.01
    X = np.random.default_rng(3).normal(size=(40, D0))
    target, params, x = _jax(p, A, B, X)
    coeffs = (("faithfulness", 1.0), ("lp_sparsity", 1.0)) if topk is None else APDConfig().coeffs
    config = APDConfig(C=C, topk=topk, batch_topk=batch_topk, coeffs=coeffs)
    out = analysis.analyze(params, target, config, None, x, None)
    _, inputs = clean_forward(target, x)
    attr = np.asarray(attr_lib.attributions("gradient", params, target, x, inputs))
    if topk is None:
        selected = attr >= 0.1 * attr.max(axis=-1, keepdims=True)
    else:
        selected = np.asarray(topk_lib.topk_mask(jnp.asarray(attr), topk, batch_topk))
    assert out["n_alive"] == int(np.any(selected, axis=0).sum()) == 2
    assert out["n_alive_norm"] == 3 and out["n_alive_norm/w1"] == out["n_alive_norm/w2"] == 3
    assert "n_alive/w1" not in out  # a component is selected for every site at once


def _torch_fans(shape):
    """torch.nn.init's fan-in / fan-out of a tensor: dim 1 / dim 0, each times the trailing dims."""
    rf = int(np.prod(shape[2:]))
    return shape[1] * rf, shape[0] * rf


@pytest.mark.parametrize("init_type", ["kaiming_uniform", "xavier_normal"])
def test_init_statistics(init_type):
    from spdjax.apd.components import init_apd

    d_in, d_out, c, m, scale = 40, 10, 50, 11, 1.5
    target = spdjax.from_apply(
        lambda p, x: linear("w", x, p["w"], None), {"w": jnp.zeros((d_in, d_out))}, sites={"w": c}
    )
    comp = init_apd(jax.random.key(3), target, c, m, scale, init_type=init_type).components["w"]
    assert comp.A.shape == (c, d_in, m) and comp.B.shape == (c, m, d_out)
    for arr, shape in ((comp.A, (c, d_in, m)), (comp.B, (c, m, d_out))):
        a = np.asarray(arr, np.float64)
        if init_type == "kaiming_uniform":  # torch kaiming_uniform_ (a=0, fan_in) on (C, d_in, m)
            fan_in, _ = _torch_fans(shape)
            bound = scale * math.sqrt(6.0 / fan_in)
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
            want_std = bound / math.sqrt(3.0)
        else:  # torch xavier_normal_ on the reference's (n_instances=1, C, ...) tensor
            fan_in, fan_out = _torch_fans((1,) + shape)
            want_std = scale * math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(a.mean()) < 4 * want_std / math.sqrt(a.size)
        np.testing.assert_allclose(a.std(), want_std, rtol=0.05)
    with pytest.raises(ValueError, match="apd.init_type"):
        init_apd(jax.random.key(0), target, c, m, init_type="normal")


SMOKE = [("apd_tms_5-2", "smoke"), ("apd_tms_40-10", "smoke"), ("apd_resid_mlp", "1,smoke"), ("apd_resid_mlp", "2,smoke")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("apd_target_cache")


@pytest.mark.parametrize("name,arg", SMOKE, ids=[f"{n}:{a}" for n, a in SMOKE])
def test_smoke_run(tmp_path, cache, name, arg):
    from helpers import run_config as run

    cfg = _load_config(name, arg)
    s = run(cfg, tmp_path / "run", cache, quiet=True)
    for key in ("n_alive", "wall_time_s", "peak_rss_mib", "n_apd_params", "loss/faithfulness"):
        assert key in s, key
    if "tms" in name:
        assert {"mmcs", "ml2r"} <= set(s)
    run_dir = tmp_path / "run"
    if "resid" in name:
        own = json.loads((run_dir / "ownership.json").read_text())
        assert len(own["own"]) == s["n_features_with_own_component"]
        assert (len(own["shared"]), len(own["split"])) == (s["n_shared_components"], s["n_split_features"])
        assert len(own["best"]) == 100
    assert json.loads((run_dir / "summary.json").read_text())["method"] == "apd"
    assert (run_dir / "metrics.jsonl").read_text().strip()
    assert (run_dir / "decomposition" / "apd.safetensors").exists()
    assert list(run_dir.glob("*.png"))


def test_resume_is_exact(tmp_path, cache):
    """Stopped after a checkpoint and resumed: the same final parameters as an uninterrupted run."""
    from helpers import run_config as run

    from spdjax.apd.export import load

    cfg = _load_config("apd_tms_5-2", "smoke")
    run(cfg, tmp_path / "a", cache, quiet=True)
    assert run(cfg, tmp_path / "b", cache, quiet=True, stop_at_step=10) is None
    run(cfg, tmp_path / "b", cache, quiet=True)
    pa, _ = load(tmp_path / "a" / "decomposition")
    pb, _ = load(tmp_path / "b" / "decomposition")
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
