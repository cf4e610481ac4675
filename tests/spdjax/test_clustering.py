"""spdjax.clustering against plain NumPy loops: the description length and the cost of every merge,
the incremental co-activation update, the samplers, the clustering comparisons; and recovery of
planted groups from noisy synthetic activations."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from spdjax import clustering as cl
from spdjax.clustering.merge import _sample
from spdjax.clustering.synthetic import planted_groups


def _groups_loop(acts, labels):
    """(OR-activation per group (N, k), rank per group) by loops."""
    k = labels.max() + 1
    g = np.zeros((acts.shape[0], k), bool)
    r = np.zeros(k)
    for c, lab in enumerate(labels):
        g[:, lab] |= acts[:, c]
        r[lab] += 1
    return g, r


def _L_loop(acts, labels, alpha):
    g, r = _groups_loop(acts, labels)
    k = g.shape[1]
    return sum(g[:, i].sum() * (np.log2(k) + alpha * r[i]) for i in range(k))


def _random_case(seed, N=80, n=9, k=6):
    rng = np.random.default_rng(seed)
    acts = rng.random((N, n)) < rng.uniform(0.05, 0.5, n)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    rng.shuffle(labels)
    return acts, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 3.0])
def test_merge_costs_equal_the_change_of_the_description_length(seed, alpha):
    acts, labels = _random_case(seed)
    g, r = _groups_loop(acts, labels)
    k = g.shape[1]
    coact = np.array([[np.sum(g[:, i] & g[:, j]) for j in range(k)] for i in range(k)], np.float32)
    got = np.asarray(cl.merge_costs(jnp.asarray(coact), jnp.asarray(r, jnp.float32), jnp.ones(k, bool), alpha))
    L = _L_loop(acts, labels, alpha)
    np.testing.assert_allclose(float(cl.description_length(jnp.asarray(g.sum(0), jnp.float32),
                                                           jnp.asarray(r, jnp.float32), alpha)), L, rtol=1e-5)
    for i, j in itertools.product(range(k), range(k)):
        if i >= j:
            assert got[i, j] == np.inf
            continue
        merged = np.where(labels == j, i, labels)
        _, merged = np.unique(merged, return_inverse=True)
        np.testing.assert_allclose(got[i, j], _L_loop(acts, merged, alpha) - L, rtol=1e-4, atol=1e-3)


def test_dead_slots_are_never_merged():
    acts, labels = _random_case(3)
    g, r = _groups_loop(acts, labels)
    coact = (g.T.astype(np.float32) @ g.astype(np.float32))
    alive = np.array([True, False, True, True, False, True])
    got = np.asarray(cl.merge_costs(jnp.asarray(coact), jnp.asarray(r, jnp.float32), jnp.asarray(alive), 1.0))
    assert np.all(np.isinf(got[~alive])) and np.all(np.isinf(got[:, ~alive]))
    assert np.isfinite(got[0, 2])


@pytest.mark.parametrize("density", [0.01, 0.3])
def test_coactivations_sparse_and_dense_paths(density):
    rng = np.random.default_rng(4)
    acts = rng.random((300, 40)) < density
    want = np.array([[np.sum(acts[:, i] & acts[:, j]) for j in range(40)] for i in range(40)])
    np.testing.assert_array_equal(cl.coactivations(acts), want)


def test_packed_bits_round_trip():
    from spdjax.clustering.mdl import pack_columns

    acts = np.random.default_rng(5).random((77, 5)) < 0.4
    bits = pack_columns(acts)
    assert bits.shape == (5, 3) and bits.dtype == np.uint32
    unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :77].T.astype(bool)
    np.testing.assert_array_equal(unpacked, acts)


@pytest.mark.parametrize("sampler", ["range", "mcmc", "exp_rank"])
def test_incremental_update_and_history_match_recomputation(sampler):
    """After t merges the co-activation state equals the groups' co-activations recomputed from the
    labels, and L[t] equals the description length of the grouping after t merges."""
    rng = np.random.default_rng(6)
    acts = rng.random((200, 24)) < rng.uniform(0.02, 0.3, 24)
    alpha = 0.5
    h = cl.merge(acts, cl.MergeConfig(alpha=alpha, sampler=sampler), seed=1)
    assert h.pairs.shape == (23, 2) and len(h.L) == 24 and len(h.dL) == 23
    for t in (0, 5, 11, 23):
        np.testing.assert_allclose(h.L[t], _L_loop(acts, h.labels_at(t), alpha), rtol=1e-4)
    part = cl.merge(acts, cl.MergeConfig(alpha=alpha, sampler=sampler), seed=1, iterations=11)
    np.testing.assert_array_equal(part.pairs, h.pairs[:11])
    labels = part.labels_at(11)
    g, _ = _groups_loop(acts, labels)
    slots = np.flatnonzero(part.alive)
    assert len(slots) == 24 - 11
    slot_label = {s: labels[s] for s in slots}  # a slot keeps its first member's index
    for a, b in itertools.product(slots, slots):
        assert part.coact[a, b] == np.sum(g[:, slot_label[a]] & g[:, slot_label[b]])
    assert np.all(part.coact[~part.alive] == 0)


def test_stop_is_the_first_positive_merge():
    rng = np.random.default_rng(7)
    acts = rng.random((300, 30)) < 0.1
    h = cl.merge(acts, cl.MergeConfig(alpha=1.0), seed=0)
    assert np.all(h.dL[: h.stop] <= 0) and (h.stop == len(h.dL) or h.dL[h.stop] > 0)
    np.testing.assert_array_equal(h.labels(), h.labels_at(h.stop))


def test_samplers_pick_cheap_pairs():
    """Samplers on a 3 x 3 cost matrix (flat index i * 3 + j): costs 1 (at 2), 1.5 (7), 3 (5), 5 (1),
    9 (8), +inf elsewhere."""
    import jax

    inf = jnp.inf
    costs = jnp.asarray([[inf, 5.0, 1.0], [inf, inf, 3.0], [inf, 1.5, 9.0]])

    def draws(cfg, n):
        keys = jax.random.split(jax.random.key(0), n)
        return np.asarray(jax.jit(jax.vmap(lambda k: _sample(costs, k, cfg)))(keys)).tolist()

    assert set(draws(cl.MergeConfig(sampler="range", range_fraction=0.0), 20)) == {2}
    within = draws(cl.MergeConfig(sampler="range", range_fraction=0.1), 400)  # below 1 + 0.1 * (9 - 1)
    assert set(within) == {2, 7} and abs(within.count(2) / 400 - 0.5) < 0.08
    assert set(draws(cl.MergeConfig(sampler="mcmc", temperature=1e-3), 20)) == {2}
    warm = draws(cl.MergeConfig(sampler="mcmc", temperature=1.0), 3000)
    w = np.exp(-np.array([0.0, 0.5, 2.0, 4.0, 8.0]))
    np.testing.assert_allclose(np.bincount(warm, minlength=9)[[2, 7, 5, 1, 8]] / 3000, w / w.sum(), atol=0.03)
    picks = draws(cl.MergeConfig(sampler="exp_rank", rank_rate=1.0, top=3), 3000)
    want = np.exp(-np.arange(3.0)) / np.exp(-np.arange(3.0)).sum()
    np.testing.assert_allclose(np.bincount(picks, minlength=9)[[2, 7, 5]] / 3000, want, atol=0.03)
    assert set(picks) <= {2, 7, 5}


def _ari_loop(a, b):
    """Adjusted Rand index by counting item pairs (Hubert and Arabie)."""
    n = len(a)
    same_a = same_b = both = 0
    for i, j in itertools.combinations(range(n), 2):
        sa, sb = a[i] == a[j], b[i] == b[j]
        same_a += sa
        same_b += sb
        both += sa and sb
    pairs = n * (n - 1) / 2
    expected = same_a * same_b / pairs
    return (both - expected) / ((same_a + same_b) / 2 - expected)


def test_comparisons():
    rng = np.random.default_rng(8)
    a = rng.integers(0, 5, 60)
    b = np.where(rng.random(60) < 0.3, rng.integers(0, 5, 60), a)
    np.testing.assert_allclose(cl.adjusted_rand_index(a, b), _ari_loop(a, b), rtol=1e-10)
    perm = np.array([3, 0, 4, 1, 2])[a]
    assert cl.adjusted_rand_index(a, perm) == pytest.approx(1.0)
    assert cl.matching_distance(a, perm) == pytest.approx(0.0)
    assert cl.purity(np.arange(60), a) == 1.0 and cl.purity(np.zeros(60), a) == np.bincount(a).max() / 60
    assert 0 < cl.matching_distance(a, b) < 1
    with pytest.raises(ValueError, match="same items"):
        cl.adjusted_rand_index(a, b[:-1])


@pytest.mark.parametrize("sampler,alpha,stop", [("range", 1.0, "first_positive"), ("exp_rank", 1.0, "first_positive"),
                                                ("mcmc", 3.0, "first_positive"), ("mcmc", 3.0, "min_length")])
def test_planted_groups_recovered(sampler, alpha, stop):
    """50 planted groups of 1-8 members with 5% of the activations moved at random: the clustering at
    the stopping point recovers them with adjusted Rand index >= 0.95 (also under the default settings)."""
    acts, truth = planted_groups(n_groups=50, n_samples=4000, p=0.05, noise=0.05)
    h = cl.merge(acts, cl.MergeConfig(alpha=alpha, sampler=sampler, stop=stop), seed=0)
    if stop == "min_length":
        assert h.L[h.stop] == h.L.min()
    ari = cl.adjusted_rand_index(h.labels(), truth)
    assert ari >= 0.95, (ari, h.labels().max() + 1)


def test_bad_configs_are_errors():
    acts = np.ones((4, 3), bool)
    with pytest.raises(ValueError, match="sampler"):
        cl.merge(acts, cl.MergeConfig(sampler="nope"))
    with pytest.raises(ValueError, match="alpha"):
        cl.merge(acts, cl.MergeConfig(alpha=-1.0))
    with pytest.raises(ValueError, match="at least 2"):
        cl.merge(np.ones((4, 1), bool))
    with pytest.raises(ValueError, match="iterations"):
        cl.merge(acts, iterations=3)
    with pytest.raises(ValueError, match="labels_at"):
        cl.merge(acts).labels_at(5)


def test_compacted_segments_keep_the_state_exact():
    """Above `MIN_COMPACT` groups the run compacts its state between segments; the history's
    description lengths and the final co-activations still match recomputation from the labels."""
    from spdjax.clustering.merge import MIN_COMPACT

    acts, _ = planted_groups(n_groups=250, n_samples=300, p=0.05, seed=3)
    n = acts.shape[1]
    assert n > MIN_COMPACT
    end = n // 2 + 10
    h = cl.merge(acts, cl.MergeConfig(alpha=1.0), seed=2, iterations=end)
    for t in (n // 2 - 1, end):  # either side of the first compaction
        np.testing.assert_allclose(h.L[t], _L_loop(acts, h.labels_at(t), 1.0), rtol=1e-4)
    labels = h.labels_at(end)
    g, _ = _groups_loop(acts, labels)
    slots = np.flatnonzero(h.alive)
    sub = g[:, labels[slots]].astype(np.int64)
    np.testing.assert_array_equal(h.coact[np.ix_(slots, slots)], sub.T @ sub)


# ---------------------------------------------------------------- inputs, groups, evaluation, output


def test_binarize_keeps_frequent_subcomponents_in_site_order():
    rng = np.random.default_rng(0)
    ci = {"b": rng.random((200, 4)) * np.array([1, 0.005, 1, 1]), "a": rng.random((200, 3)) * 0.3}
    ci["a"][:, 1] = 0.0
    ci["a"][:3, 2] = 0.9  # active on 3 of 200 rows (1.5%)
    ci["a"][3:, 2] = 0.0
    acts = cl.binarize(ci, tau=0.1, freq_floor=0.02)
    kept_b = [0, 2, 3]
    kept_a = [c for c in range(3) if (ci["a"][:, c] > 0.1).mean() >= 0.02]
    assert acts.members == tuple([("b", c) for c in kept_b] + [("a", c) for c in kept_a])
    want = np.concatenate([ci["b"][:, kept_b], ci["a"][:, kept_a]], axis=1) > 0.1
    np.testing.assert_array_equal(acts.acts, want)
    np.testing.assert_allclose(acts.frequency, want.mean(0))
    assert acts.n_dropped == {"b": 1, "a": 3 - len(kept_a)} and ("a", 2) not in acts.members
    assert cl.binarize(ci, tau=0.1, freq_floor=0.02, sites=["a"]).members == tuple(("a", c) for c in kept_a)
    with pytest.raises(ValueError, match="different numbers of rows"):
        cl.binarize({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="tau"):
        cl.binarize(ci, tau=1.5)
    with pytest.raises(ValueError, match="no causal importances"):
        cl.binarize(ci, sites=["c"])


def test_rows_samples_the_same_positions_for_every_site():
    from spdjax.clustering.inputs import rows

    ci = np.arange(2 * 5 * 3, dtype=float).reshape(2, 5, 3)
    assert rows(ci).shape == (10, 3)
    a = rows(ci, 2, np.random.default_rng([1, 0]))
    b = rows(ci + 1000, 2, np.random.default_rng([1, 0]))
    assert a.shape == (4, 3)
    np.testing.assert_array_equal(a + 1000, b)
    pos = (a[:, 0] % 15) // 3  # position of each row within its sequence
    assert len(set(pos[:2])) == 2 and len(set(pos[2:])) == 2  # distinct positions per sequence
    assert rows(ci, 6).shape == (10, 3)  # a shorter sequence gives all its positions
    with pytest.raises(ValueError, match="positions_per_sequence"):
        rows(ci, 0)


def test_groups_stability_and_output_files(tmp_path):
    import json

    acts, truth = planted_groups(n_groups=8, n_samples=2000, noise=0.02, max_size=4, seed=3)
    members = tuple(("s0" if j % 2 else "s1", j) for j in range(acts.shape[1]))
    a = cl.Activations(acts, members, acts.mean(0), {"s0": 0, "s1": 0}, 0.01, 0.0)
    c = cl.cluster(a, cl.MergeConfig(alpha=1.0), seeds=(0, 1, 2))
    groups = c.groups()
    assert sum(g["size"] for g in groups) == acts.shape[1]
    for g in groups:  # a group's frequency is where any member is active
        cols = [m[1] for m in g["members"]]
        assert g["frequency"] == pytest.approx(acts[:, cols].any(1).mean())
    st = c.stability()
    h = c.histories
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([cl.matching_distance(h[i].labels(), h[j].labels()) for i, j in pairs])
    assert st["stop/mean"] == pytest.approx(want)
    t = int(round(0.5 * (acts.shape[1] - 1)))
    want = max(cl.matching_distance(h[i].labels_at(t), h[j].labels_at(t)) for i, j in pairs)
    assert st["at_0.5/max"] == pytest.approx(want)
    assert cl.cluster(a, seeds=(4,)).stability() == {}

    out = cl.write(c, tmp_path / "out", {"ari": 1.0})
    saved = json.loads((tmp_path / "out" / "clusters.json").read_text())
    assert saved == json.loads(json.dumps(out)) and saved["evaluation"] == {"ari": 1.0}
    assert saved["n_groups"] == len(groups) and [s["seed"] for s in saved["seeds"]] == [0, 1, 2]
    hist = np.load(tmp_path / "out" / "merge_history.npz")
    np.testing.assert_array_equal(hist["labels"], c.labels)
    replay = cl.MergeHistory(hist["pairs_1"], hist["dL_1"], hist["L_1"], acts.shape[1], int(hist["stop_1"]), None, None)
    np.testing.assert_array_equal(replay.labels(), h[1].labels())
    assert list(hist["members"][:2]) == ["s1/0", "s0/1"]
    assert (tmp_path / "out" / "cost_curve.png").stat().st_size > 0
    assert (tmp_path / "out" / "coactivation.png").stat().st_size > 0
    with pytest.raises(ValueError, match="need at least 2"):
        cl.cluster(cl.Activations(acts[:, :1], members[:1], acts[:1].mean(0), {}, 0.01, 0.0))


def test_evaluate_against_a_hand_computed_truth():
    members = [("l0", 0), ("l0", 1), ("l1", 0), ("l1", 1), ("id", 0), ("l1", 2)]
    truth = cl.MechanismTruth({"l0": np.array([0, 1]), "l1": np.array([0, 1, 2]), "id": np.array([-1])},
                              {"l0": 0, "l1": 1, "id": 1})
    labels = np.array([0, 1, 0, 1, 1, 1])  # group 1 mixes mechanisms 1 and 2 (and the unscored identity)
    out = cl.evaluate(labels, members, truth)
    scored = np.array([0, 1, 0, 1, 2])
    pred = np.array([0, 1, 0, 1, 1])
    assert out["n_scored"] == 5 and out["n_groups"] == 2 and out["n_mechanisms"] == 3
    assert out["ari"] == pytest.approx(cl.adjusted_rand_index(pred, scored))
    assert out["purity"] == pytest.approx(4 / 5)
    assert out["separated"] == pytest.approx(1 / 3)  # only mechanism 0 is alone in its group
    assert out["cross_layer"] == 1.0  # both groups hold layer 0 and layer 1 members
    out = cl.evaluate(np.array([0, 1, 2, 3, 4, 5]), members, truth)
    assert out["separated"] == 1.0 and "cross_layer" not in out  # no group of two or more


def test_cluster_mode_refuses_an_apd_run(tmp_path):
    import importlib.util

    from spdjax.clustering.workflow import cluster_workdir

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("cfg", root / "configs" / "apd_tms_5-2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ValueError, match="SPD run"):
        cluster_workdir(mod.get_config("smoke"), tmp_path, build=None)
