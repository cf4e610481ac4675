"""Subset routing, PGD adversarial masks and hidden-activation recon against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_ref as ref
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from test_terms import B, T, _build, _np_comps, _random_masks

from spdjax import losses
from spdjax import masks as masks_lib
from spdjax.masks import SiteMask

RTOL, ATOL = 1e-5, 1e-6
NAMES = ("fc1", "fc2")
CS = (3, 4)


def _j(x):
    return jnp.asarray(x, jnp.float32)


def _ci(rng, lead=(B, T), hi=0.9):
    """CI values in [0, hi] with exact zeros (g = 1 would make a site's sources irrelevant)."""
    out = []
    for c in CS:
        g = rng.uniform(0, hi, size=lead + (c,))
        g[rng.uniform(size=g.shape) < 0.2] = 0.0
        out.append(g)
    return out


# ============================================================================= subset routing


@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "no_delta"])
def test_stochastic_recon_subset_explicit_masks_and_routes(use_delta):
    _, target, params, layers, x = _build()
    rng = np.random.default_rng(21)
    S = 2
    masks_np = _random_masks(rng, S, CS, use_delta)
    routes_np = [rng.uniform(size=(S, B, T)) < 0.5 for _ in CS]
    site_masks = {n: SiteMask(_j(m), None if md is None else _j(md)) for n, (m, md) in zip(NAMES, masks_np)}
    routes = {n: jnp.asarray(r) for n, r in zip(NAMES, routes_np)}
    out = target(x)
    f = jax.jit(losses.stochastic_recon_subset_loss, static_argnames="output_loss")
    got = float(f(params, target, x, out, site_masks, routes))
    want = ref.subset_recon(x, layers, _np_comps(params), masks_np, routes_np)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # every site routed everywhere is the stochastic recon; none routed is the target itself
    all_on = {n: jnp.ones((S, B, T), bool) for n in NAMES}
    np.testing.assert_allclose(
        float(f(params, target, x, out, site_masks, all_on)),
        ref.stochastic_recon(x, layers, _np_comps(params), masks_np), rtol=RTOL, atol=ATOL,
    )
    all_off = {n: jnp.zeros((S, B, T), bool) for n in NAMES}
    assert float(f(params, target, x, out, site_masks, all_off)) < 1e-10
    assert abs(want - ref.stochastic_recon(x, layers, _np_comps(params), masks_np)) > 1e-4


def test_route_masks_folds_routing_into_masks():
    m = jnp.asarray([[0.2, 0.3], [0.4, 0.5]])
    d = jnp.asarray([0.6, 0.7])
    r = jnp.asarray([True, False])
    out = masks_lib.route_masks({"a": SiteMask(m, d), "b": SiteMask(m, None)}, {"a": r, "b": r})
    np.testing.assert_array_equal(out["a"].mask, np.asarray([[0.2, 0.3], [1.0, 1.0]], np.float32))
    np.testing.assert_array_equal(out["a"].delta, np.asarray([0.6, 1.0], np.float32))
    np.testing.assert_array_equal(out["b"].delta, [0.0, 1.0])  # no delta term where routed


def test_uniform_k_routing_statistics():
    names = ("a", "b", "c", "d")
    n = 40_000
    routes = masks_lib.sample_routes(jax.random.key(0), (n,), names, "uniform_k")
    r = np.stack([np.asarray(routes[k]) for k in names], -1)
    k = r.sum(-1)
    assert k.min() >= 1 and k.max() <= 4
    freq_k = np.bincount(k, minlength=5)[1:] / n
    np.testing.assert_allclose(freq_k, 0.25, atol=0.015)  # k ~ U{1..L}
    for kk, n_subsets in ((1, 4), (2, 6), (3, 4)):  # given k, every k-subset equally likely
        rows = r[k == kk]
        codes = rows @ (1 << np.arange(4))
        counts = np.unique(codes, return_counts=True)[1]
        assert len(counts) == n_subsets
        np.testing.assert_allclose(counts / len(rows), 1 / n_subsets, atol=0.02)
    # per-position independence: another key routes differently
    other = masks_lib.sample_routes(jax.random.key(1), (n,), names, "uniform_k")
    assert (np.asarray(other["a"]) != r[:, 0]).mean() > 0.3


def test_static_p_routing_statistics():
    names = ("a", "b", "c")
    n = 40_000
    routes = masks_lib.sample_routes(jax.random.key(2), (n, 2), names, "static_p", p=0.3)
    r = np.stack([np.asarray(routes[k]) for k in names], -1).reshape(-1, 3)
    np.testing.assert_allclose(r.mean(0), 0.3, atol=0.01)
    np.testing.assert_allclose((r[:, 0] & r[:, 1]).mean(), 0.09, atol=0.01)  # independent sites
    assert (r.sum(-1) == 0).any()  # no site routed is allowed


def test_ci_masked_recon_subset_in_loss_fn():
    """The term inside loss_fn equals the reference with the routes loss_fn samples (same key)."""
    _, target, params, layers, x = _build()
    cfg = losses.LossConfig(coeffs=(("ci_masked_recon_subset", 1.0),), subset_routing="static_p", subset_p=0.5)
    key = jax.random.key(3)
    _, metrics = jax.jit(losses.loss_fn)(params, target, x, key, cfg)
    lead = (B, T)
    routes = masks_lib.sample_routes(jax.random.fold_in(key, 5), lead, NAMES, "static_p", 0.5)
    out, inputs = losses.clean_forward(target, x)
    ci = losses.compute_ci(params, target, inputs, cfg.sigmoid).lower
    masks_np = [(ref.f64(ci[n])[None], None) for n in NAMES]
    want = ref.subset_recon(x, layers, _np_comps(params), masks_np, [np.asarray(routes[n])[None] for n in NAMES])
    np.testing.assert_allclose(float(metrics["loss/ci_masked_recon_subset"]), want, rtol=RTOL, atol=ATOL)


# ============================================================================= PGD


@pytest.mark.parametrize("scope", ["per_example", "shared_across_batch"])
@pytest.mark.parametrize("variant", ["all", "layerwise", "subset"])
def test_pgd_recon_matches_reference(scope, variant):
    _, target, params, layers, x = _build()
    rng = np.random.default_rng(31)
    ci_np = _ci(rng)
    ci = {n: _j(g) for n, g in zip(NAMES, ci_np)}
    out = target(x)
    cfg = losses.LossConfig(pgd_init="random", pgd_n_steps=2, pgd_step_size=0.3, pgd_mask_scope=scope)
    key = jax.random.key(4)
    only = "fc2" if variant == "layerwise" else None
    routes_np = [rng.uniform(size=(B, T)) < 0.6 for _ in CS] if variant == "subset" else None
    routes = None if routes_np is None else {n: jnp.asarray(r) for n, r in zip(NAMES, routes_np)}
    got = float(jax.jit(losses.pgd_recon_loss, static_argnames=("config", "only_site"))(
        params, target, x, out, ci, key, cfg, routes, only))
    used = ci if only is None else {only: ci[only]}
    init = masks_lib.pgd_sources_init(key, used, "random", scope, True)
    init_np = {NAMES.index(n): (ref.f64(a), ref.f64(ad)) for n, (a, ad) in init.items()}
    want, src_np = ref.pgd_recon(
        x, layers, _np_comps(params), ci_np, init_np, 2, 0.3, scope == "shared_across_batch",
        only=None if only is None else NAMES.index(only), routes=routes_np,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # the sources themselves
    def loss_of_masks(m):
        m = m if routes is None else masks_lib.route_masks(m, routes)
        return losses.divergence("mse", losses.masked_forward(params, target, x, m), out)

    src = masks_lib.pgd_sources(loss_of_masks, used, key, 2, 0.3, "random", scope, True)
    for n, (a, ad) in src.items():
        np.testing.assert_allclose(np.asarray(a), src_np[NAMES.index(n)][0], atol=1e-6)
        np.testing.assert_allclose(np.asarray(ad), src_np[NAMES.index(n)][1], atol=1e-6)
    # the adversary found something worse than its starting point
    start = ref.pgd_recon(x, layers, _np_comps(params), ci_np, init_np, 0, 0.3, scope == "shared_across_batch",
                          only=None if only is None else NAMES.index(only), routes=routes_np)[0]
    assert want > start


@pytest.mark.parametrize("scope", ["per_example", "shared_across_batch"])
@pytest.mark.parametrize("init", ["random", "ones", "zeros"])
def test_pgd_ascends_and_stays_in_unit_box(scope, init):
    _, target, params, layers, x = _build()
    rng = np.random.default_rng(41)
    ci = {n: _j(g) for n, g in zip(NAMES, _ci(rng))}
    out = target(x)

    def loss_of_masks(m):
        return losses.divergence("mse", losses.masked_forward(params, target, x, m), out)

    key = jax.random.key(5)
    start = masks_lib.pgd_sources_init(key, ci, init, scope, True)
    l0 = float(loss_of_masks(masks_lib.masks_from_sources(ci, start)))
    small = masks_lib.pgd_sources(loss_of_masks, ci, key, 1, 1e-3, init, scope, True)
    assert float(loss_of_masks(masks_lib.masks_from_sources(ci, small))) > l0  # one small step goes uphill
    big = masks_lib.pgd_sources(loss_of_masks, ci, key, 3, 5.0, init, scope, True)
    for n, (a, ad) in big.items():
        shape = (B, T, ci[n].shape[-1]) if scope == "per_example" else (ci[n].shape[-1],)
        assert a.shape == shape and ad.shape == shape[:-1]
        for arr in (np.asarray(a), np.asarray(ad)):
            assert arr.min() >= 0.0 and arr.max() <= 1.0
            assert np.isin(arr, (0.0, 1.0)).mean() > 0.9  # big steps end on the box's corners
    for n, (a, ad) in masks_lib.pgd_sources(loss_of_masks, ci, key, 0, 1.0, init, scope, True).items():
        np.testing.assert_array_equal(a, start[n][0])  # zero steps: the init itself
    if init != "random":
        want = 1.0 if init == "ones" else 0.0
        assert all(float(jnp.all(start[n][0] == want)) for n in NAMES)


def test_pgd_shared_sources_identical_under_data_sharding():
    """Shared sources depend on the whole (global) batch: sharded over 8 devices they equal the
    unsharded ones and are the same on every device."""
    _, target, params, layers, _ = _build()
    rng = np.random.default_rng(51)
    xb = _j(rng.normal(size=(8, T, 4)))
    cib = {n: _j(g) for n, g in zip(NAMES, _ci(rng, lead=(8, T)))}
    key = jax.random.key(6)

    def shared_sources(x, ci):
        out = target(x)

        def loss_of_masks(m):
            return losses.divergence("mse", losses.masked_forward(params, target, x, m), out)

        return masks_lib.pgd_sources(loss_of_masks, ci, key, 2, 0.2, "random", "shared_across_batch", True)

    want = jax.jit(shared_sources)(xb, cib)
    mesh = jax.make_mesh((8,), ("data",))
    sh = NamedSharding(mesh, P("data"))
    got = jax.jit(shared_sources)(jax.device_put(xb, sh), jax.device_put(cib, sh))
    for n in NAMES:
        for w, g in zip(want[n], got[n]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
            shards = [np.asarray(s.data) for s in g.addressable_shards]
            assert len(shards) == 8 and all(np.array_equal(s, shards[0]) for s in shards)


# ============================================================================= hidden acts, loss_fn


def test_hidden_acts_recon_explicit_masks():
    _, target, params, layers, x = _build()
    rng = np.random.default_rng(61)
    masks_np = [(m[0], md[0]) for m, md in _random_masks(rng, 1, CS, True)]
    site_masks = {n: SiteMask(_j(m), _j(md)) for n, (m, md) in zip(NAMES, masks_np)}
    _, inputs = losses.clean_forward(target, x)
    got = float(jax.jit(losses.hidden_acts_recon_loss)(params, target, x, inputs, site_masks))
    want = ref.hidden_acts_recon(x, layers, _np_comps(params), masks_np)
    assert want > 1e-4
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


NEW_TERMS = ("stochastic_recon_subset", "ci_masked_recon_subset", "pgd_recon", "pgd_recon_layerwise",
             "pgd_recon_subset", "stochastic_hidden_acts_recon")


def test_loss_fn_new_terms_total_and_determinism():
    _, target, params, _, x = _build()
    coeffs = tuple((t, 0.5 + i) for i, t in enumerate(NEW_TERMS))
    cfg = losses.LossConfig(coeffs=coeffs, n_mask_samples=2, pgd_mask_scope="shared_across_batch")
    f = jax.jit(losses.loss_fn)
    total, m = f(params, target, x, jax.random.key(7), cfg)
    assert all(float(m[f"loss/{t}"]) > 0 for t in NEW_TERMS)
    np.testing.assert_allclose(float(total), sum(c * float(m[f"loss/{t}"]) for t, c in coeffs), rtol=1e-6)
    total2, _ = f(params, target, x, jax.random.key(7), cfg)
    assert float(total2) == float(total)
    total3, _ = f(params, target, x, jax.random.key(8), cfg)
    assert float(total3) != float(total)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_loss_fn_new_terms_check_grads_x64(x64):
    import jax.numpy as jnp

    _, target, params, _, x = _build(dims=(3, 4, 3), Cs=(3, 2), seed=4, dtype=jnp.float64, ci_hidden=(3,))
    cfg = losses.LossConfig(
        coeffs=tuple((t, 1.0) for t in NEW_TERMS[:5]), sigmoid="logistic", pgd_step_size=0.1, pgd_n_steps=1,
    )
    key = jax.random.key(9)
    f = jax.jit(lambda p: losses.loss_fn(p, target, x, key, cfg)[0])
    check_grads(f, (params,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("subset_routing", "random"), ("subset_p", 0.0), ("pgd_init", "gauss"),
    ("pgd_mask_scope", "per_batch"), ("pgd_n_steps", -1), ("pgd_step_size", 0.0),
])
def test_loss_config_rejects_bad_subset_pgd_fields(field, value):
    with pytest.raises(ValueError, match=f"loss.{field}"):
        losses.LossConfig(**{field: value})


def test_one_hot_recon_error_against_reference():
    from test_terms import _np_ci

    from spdjax import metrics

    _, target, params, layers, _ = _build()
    got = metrics.one_hot_recon_error(params, target, 4, 0.75)
    x = 0.75 * np.eye(4)
    _, lower, _ = _np_ci(params, layers, x, "leaky_hard")
    comps = _np_comps(params)
    pred = ref.mlp_forward(x, layers, site_masks={i: (g, None, V, U) for i, (g, (V, U)) in enumerate(zip(lower, comps))})
    want = np.mean((pred - ref.mlp_forward(x, layers)) ** 2, axis=-1)
    assert got.shape == (4,) and want.min() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_expected_ci_l0_matches_spec_numbers():
    from experiments.resid_mlp.analysis import expected_ci_l0

    assert expected_ci_l0(100, 50, 0.01)["w_in_total"] == pytest.approx(1.0)
    for (n_f, d, want) in ((100, 50, 31.7), (100, 25, 15.8), (102, 17, 10.9)):  # toy_models.md
        assert expected_ci_l0(n_f, d, 0.01)["w_out_per_layer"] == pytest.approx(want, abs=0.05)
