"""The TMS experiment family: target training, the represented-feature check, the cache, build/analyze."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
import spdjax
from experiments import tms
from experiments.tms import analysis, train_target
from spdjax.ci import CIParams
from spdjax.components import Components
from spdjax.config import load_config_file, parse
from spdjax.decomposition import SPDParams

ROOT = Path(__file__).resolve().parents[2]


def pentagon(n=5, radius=1.0):
    ang = 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(ang), np.sin(ang)]).astype(np.float32)  # (2, n)


def load_config(name, arg=None):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


# ----------------------------------------------------------------------------- target training


def test_target_training_is_deterministic():
    cfg = train_target.TMSTargetConfig(5, 2, steps=200, batch_size=128)
    W1, b1, l1 = train_target.train_tms(cfg, 3)
    W2, b2, l2 = train_target.train_tms(cfg, 3)
    W3, _, _ = train_target.train_tms(cfg, 4)
    assert W1.shape == (2, 5) and b1.shape == (5,) and l1.shape == (200,)
    np.testing.assert_array_equal(W1, W2)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(l1, l2)
    assert not np.allclose(W1, W3)
    assert l1[-20:].mean() < l1[:20].mean()  # it learns
    # bias_init_zero starts from b = 0
    p = train_target.init_params(jax.random.PRNGKey(0), 5, 2, True)
    assert np.all(np.asarray(p["b"]) == 0)


def test_represented_features_on_hand_made_weights():
    W = pentagon(radius=1.0)  # ||W_i|| = 1: output for 0.75 e_i is 0.75 + b_i at index i
    b = np.zeros(5, np.float32)
    assert tms.represented_features(W, b).all()
    b[1] = -0.2  # 0.55: outside 0.75 +- 0.1
    W[:, 3] = 0.0  # a dropped feature: output relu(b_3) = 0
    b[4] = -0.09  # 0.66: inside
    np.testing.assert_array_equal(tms.represented_features(W, b), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(tms.represented_features(W, b, tol=0.25), [1, 1, 1, 0, 1])


def _fake_trainer(good_seeds, calls=None):
    def trainer(cfg, seed):
        if calls is not None:
            calls.append(seed)
        W = pentagon()
        if seed not in good_seeds:
            W[:, seed % 5] = 0.0  # drops a feature
        return W, np.zeros(5, np.float32), np.full(cfg.steps, 0.01, np.float32)

    return trainer


def test_seed_advances_until_every_feature_is_represented():
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=10)
    calls = []
    W, b, info = train_target.train_represented(cfg, _fake_trainer({12, 13}, calls))
    assert calls == [10, 11, 12]
    assert info["seed_used"] == 12 and info["n_represented"] == 5
    assert [t["n_represented"] for t in info["tries"]] == [4, 4, 5]
    # without the requirement the first seed is kept
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=10, require_all_features=False)
    _, _, info = train_target.train_represented(cfg, _fake_trainer({12}))
    assert info["seed_used"] == 10 and info["n_represented"] == 4
    # capped, with a clear error
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=0, max_seed_tries=3)
    with pytest.raises(RuntimeError, match=r"no seed in 0\.\.2 .*all 5 features"):
        train_target.train_represented(cfg, _fake_trainer(set()))


def test_cache_is_reused(tmp_path):
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=1)
    calls = []
    W, b, info = train_target.load_or_train(cfg, tmp_path, _fake_trainer({2}, calls))
    assert calls == [1, 2] and not info["cached"] and info["seed_used"] == 2

    def boom(cfg, seed):
        raise AssertionError("retrained despite the cache")

    W2, b2, info2 = train_target.load_or_train(cfg, tmp_path, boom)
    assert info2["cached"] and info2["seed_used"] == 2
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(b, b2)
    npz, sidecar = train_target.cache_paths(cfg, tmp_path)
    meta = json.loads(sidecar.read_text())
    assert meta["config"]["seed"] == 1 and meta["info"]["seed_used"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    # any change of the target config is a different cache entry
    other = train_target.TMSTargetConfig(5, 2, steps=11, seed=1)
    assert train_target.cache_paths(other, tmp_path)[0] != npz
    with pytest.raises(AssertionError, match="retrained"):
        train_target.load_or_train(other, tmp_path, boom)


def _boom(cfg, seed):
    raise AssertionError("retrained")


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "not_a_zip":
        path.write_bytes(b"not an npz file at all")
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a flipped byte inside W's data: the zip member's CRC fails
        raw = bytearray(raw)
        raw[raw.index(b"W.npy") + 120] ^= 0x01
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "not_a_zip", "empty", "flipped"])
def test_damaged_cache_is_a_one_line_error_naming_the_file(tmp_path, how):
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=2)
    train_target.load_or_train(cfg, tmp_path, _fake_trainer({2}))
    npz, sidecar = train_target.cache_paths(cfg, tmp_path)
    _damage(npz, how)
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(cfg, tmp_path, _boom)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"target cache: {str(npz)!r} is damaged"), msg
    assert msg.endswith(f"delete it and {sidecar.name} to retrain the target"), msg
    # deleting it, as told, retrains
    npz.unlink()
    sidecar.unlink()
    _, _, info = train_target.load_or_train(cfg, tmp_path, _fake_trainer({2}))
    assert not info["cached"]


def test_wrong_shaped_or_garbled_cache(tmp_path):
    cfg = train_target.TMSTargetConfig(5, 2, steps=10, seed=2)
    train_target.load_or_train(cfg, tmp_path, _fake_trainer({2}))
    npz, sidecar = train_target.cache_paths(cfg, tmp_path)
    good = npz.read_bytes()
    np.savez(npz, W=np.zeros((3, 5), np.float32), b=np.zeros(5, np.float32))
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(cfg, tmp_path, _boom)
    assert str(e.value) == (
        f"target cache: {str(npz)!r} has the wrong shapes: W (3, 5), the config needs (n_hidden, n_features) = "
        f"(2, 5); delete it and {sidecar.name} to retrain the target"
    )
    np.savez(npz, W=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"must hold arrays \['W', 'b'\] \(missing \['b'\]\); delete it"):
        train_target.load_or_train(cfg, tmp_path, _boom)
    np.savez(npz, W=np.full((2, 5), np.nan, np.float32), b=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"\['W'\] hold non-finite values; delete it"):
        train_target.load_or_train(cfg, tmp_path, _boom)
    npz.write_bytes(good)
    sidecar.write_text(sidecar.read_text()[:40])
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(cfg, tmp_path, _boom)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"target cache sidecar {str(sidecar)!r} is damaged, not valid JSON"), msg
    assert msg.endswith(f"delete it and {npz.name} to retrain the target"), msg


def test_weights_path(tmp_path):
    missing = train_target.TMSTargetConfig(5, 2, weights_path=str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match=r"config\.target\.weights_path: target file '.*nope\.npz' does not exist"):
        train_target.load_or_train(missing, tmp_path)
    path = tmp_path / "mine.npz"
    np.savez(path, W=pentagon(), b=np.zeros(5))
    cfg = train_target.TMSTargetConfig(5, 2, weights_path=str(path))
    W, b, info = train_target.load_or_train(cfg, None, _boom)
    np.testing.assert_array_equal(W, pentagon())
    assert W.dtype == b.dtype == np.float32 and info["platform"] == "file"
    remedy = "give an .npz (numpy.savez) with arrays W (n_hidden, n_features), b (n_features,)"
    other = train_target.TMSTargetConfig(5, 3, weights_path=str(path))
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(other, None, _boom)
    assert str(e.value) == (f"config.target.weights_path: {str(path)!r} has the wrong shapes: W (2, 5), the config "
                            f"needs (n_hidden, n_features) = (3, 5); {remedy}")
    for how in ("truncated", "not_a_zip", "flipped"):
        np.savez(path, W=pentagon(), b=np.zeros(5))
        _damage(path, how)
        with pytest.raises(ValueError) as e:
            train_target.load_or_train(cfg, None, _boom)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"config.target.weights_path: {str(path)!r} is damaged"), msg
        assert msg.endswith(remedy), msg
    np.save(tmp_path / "single.npy", pentagon())
    single = train_target.TMSTargetConfig(5, 2, weights_path=str(tmp_path / "single.npy"))
    with pytest.raises(ValueError, match=r"single\.npy' is a single \.npy array, not an \.npz file"):
        train_target.load_or_train(single, None, _boom)


def test_target_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*banana"):
        train_target.TMSTargetConfig.from_section({"n_features": 5, "n_hidden": 2, "banana": 1})
    with pytest.raises(ValueError, match="n_hidden"):
        train_target.TMSTargetConfig.from_section({"n_features": 5})


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name,nf,nh,C,identity,coeff,p",
    [
        ("tms_5-2", 5, 2, 20, False, 3e-3, 1.0),
        ("tms_5-2_id", 5, 2, 20, True, 3e-3, 1.0),
        ("tms_40-10", 40, 10, 200, False, 1e-4, 2.0),
        ("tms_40-10_id", 40, 10, 200, True, 1e-4, 2.0),
    ],
)
def test_configs_parse(name, nf, nh, C, identity, coeff, p):
    run = parse(load_config(name))
    assert run.experiment == "tms"
    assert (run.target.n_features, run.target.n_hidden) == (nf, nh)
    assert run.target.batch_size == (1024 if nf == 5 else 8192)
    assert run.target.bias_init_zero == (nf == 40)
    assert [(s.pattern, s.C) for s in run.sites] == [("linear1", C), ("linear2", C)]
    assert run.tied == (("linear2", "linear1"),)
    assert [(s.pattern, s.C) for s in run.identity] == ([("linear2", C)] if identity else [])
    assert run.method.settings.loss.coeff_dict == {
        "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": coeff
    }
    assert run.method.settings.loss.pnorm == p and run.method.settings.loss.use_delta_component and run.method.settings.loss.n_mask_samples == 1
    assert (run.optim.steps, run.optim.lr, run.optim.schedule, run.optim.final_lr_frac) == (
        10_000, 1e-3, "cosine", 0.0
    )
    assert run.optim.faithfulness_warmup_steps == 200
    assert (run.method.settings.ci_type, run.method.settings.ci_hidden, run.batch_size) == ("mlp", (16,), 4096)
    smoke = parse(load_config(name, "smoke"))
    assert smoke.optim.steps <= 50 and smoke.batch_size <= 256
    assert not smoke.target.require_all_features and smoke.target.steps <= 300


# ----------------------------------------------------------------------------- build / analyze


def test_build_smoke(tmp_path, monkeypatch):
    run = parse(load_config("tms_5-2_id", "smoke"))
    exp = experiments.build(run, tmp_path / "cache")
    assert isinstance(exp, experiments.Experiment)
    t = exp.target
    assert t.site_names == ("linear1", "linear2.pre_identity", "linear2")
    assert t.site("linear2").tied_to == "linear1"
    assert "seed_used" in exp.info

    # the target computes ReLU(W^T W x + b) with the cached weights
    npz = next((tmp_path / "cache").glob("tms-5-2-*.npz"))
    with np.load(npz) as d:
        W, b = d["W"], d["b"]
    x = jax.random.uniform(jax.random.PRNGKey(0), (7, 5))
    np.testing.assert_allclose(t(x), tms.tms_forward(W, b, x), rtol=1e-5, atol=1e-6)

    # batches: jittable, right shape, sparse, values in [0, 1]
    batch = jax.jit(exp.batch_fn)(jax.random.PRNGKey(1))
    assert batch.shape == (run.batch_size, 5) and batch.dtype == jnp.float32
    frac = float(jnp.mean(batch > 0))
    assert 0.02 < frac < 0.09 and float(batch.min()) >= 0 and float(batch.max()) <= 1

    # a second build reuses the cache (training would raise)
    def boom(*a, **k):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(train_target, "train_tms", boom)
    exp2 = experiments.build(run, tmp_path / "cache")
    assert exp2.info["cached"] and exp2.info["seed_used"] == exp.info["seed_used"]

    # a couple of SPD steps, then the analysis
    from spdjax.train import train

    params = spdjax.init_decomposition(jax.random.PRNGKey(0), t, run.method.settings.ci_type, run.method.settings.ci_hidden)
    optim = run.optim.__class__(**{**run.optim.__dict__, "steps": 2, "faithfulness_warmup_steps": 2})
    state, hist = train(t, params, run.method.settings.loss, optim, jax.random.PRNGKey(1), batch_fn=exp.batch_fn)
    out = exp.analyze(state.params, t, tmp_path / "run", run.method.settings.loss)
    json.dumps(out)  # flat and JSON-able
    for k in [
        "mmcs", "ml2r", "n_alive/linear1", "n_alive/linear2", "n_alive/linear2.pre_identity", "n_alive",
        "n_alive_norm/linear1", "n_alive_norm/linear2.pre_identity", "n_alive_norm", "ci_l0/linear1",
        "ci_l0/linear2", "ci_l0/linear2.pre_identity", "n_ci_active/linear1", "identity_ci_error/linear1",
        "identity_ci_error/linear2", "identity_ci_error/linear2.pre_identity", "identity_ci_error",
        "target_seed",
    ]:
        assert k in out, k
    assert all(not isinstance(v, (dict, list)) for v in out.values())
    assert out["target_seed"] == exp.info["seed_used"]
    assert 0 <= out["n_alive/linear1"] <= 20 and 0 <= out["n_alive_norm/linear1"] <= 20
    assert "n_alive_norm/linear2" not in out  # tied: no parameters of its own
    pngs = sorted(p.name for p in (tmp_path / "run").glob("*.png"))
    assert pngs == ["ci_one_hot.png", "columns_linear1.png", "columns_linear2.pre_identity.png"]


def _perfect_params(W, C=20, residue=0.0):
    """Hand-made ideal SPD solution for TMS 5-2 +ID: one subcomponent per feature, I split in two,
    CI functions that are 1 exactly where the subcomponent is needed on one-hot inputs.

    `residue` > 0: never-active subcomponents keep a small norm, as training leaves them (toy_models.md):
    the identity's other 18 share a correction `residue * (1, 1)` (liveness 2 sqrt(2) residue), linear1's
    subcomponent 5 is a column of norm 10 * residue orthogonal to W's first column; their CI stays < 0.1."""
    n_h, n_f = W.shape
    V1, U1 = np.zeros((n_f, C)), np.zeros((C, n_h))
    V1[np.arange(n_f), np.arange(n_f)] = 1.0
    U1[:n_f] = W.T
    Vi, Ui = np.zeros((n_h, C)), np.zeros((C, n_h))
    Vi[np.arange(n_h), np.arange(n_h)] = 1.0
    Ui[np.arange(n_h), np.arange(n_h)] = 1.0
    if residue:
        V1[0, n_f] = 1.0
        U1[n_f] = 10 * residue * np.array([-W[1, 0], W[0, 0]]) / np.linalg.norm(W[:, 0])
        Vi[:, n_h:] = 1.0
        Ui[n_h:] = residue

    def ci(w1, b1, b2):  # z_c = gelu(w1 h_c + b1) + b2_c, hidden width 1
        f = lambda a: jnp.asarray(a, jnp.float32)
        return CIParams(
            (f(np.full((C, 1, 1), w1)), f(np.ones((C, 1, 1)))),
            (f(np.full((C, 1), b1)), f(np.asarray(b2).reshape(C, 1))),
            "mlp",
        )

    # linear sites: h = 0.75 ||W_i||^2 ~ 0.75 on the own feature, |h| <= 0.75 cos(72 deg) elsewhere
    sparse = ci(10.0, -5.0, np.where(np.arange(C) == n_f, -10.0, 0.0) if residue else np.zeros(C))
    dense = ci(0.0, 0.0, np.where(np.arange(C) < n_h, 2.0, -1.0))  # always on / always off
    comps = {
        "linear1": Components(jnp.asarray(V1, jnp.float32), jnp.asarray(U1, jnp.float32)),
        "linear2.pre_identity": Components(jnp.asarray(Vi, jnp.float32), jnp.asarray(Ui, jnp.float32)),
    }
    return SPDParams(comps, {"linear1": sparse, "linear2": sparse, "linear2.pre_identity": dense})


def test_analyze_perfect_solution(tmp_path):
    W, b = pentagon(), np.full(5, -0.1, np.float32)
    target = spdjax.from_nnx(
        tms.tms_from_weights(W, b), sites=[("linear1", 20), ("linear2", 20)],
        tied={"linear2": "linear1"}, identity=[("linear2", 20)],
    )
    sample = lambda key: train_target.sample_features(key, 512, 5, 0.05)
    analyze = analysis.make_analyze(
        n_features=5, eval_batch_fn=sample, seed=0,
        info={"seed_used": 7, "n_represented": 5},
    )
    out = analyze(_perfect_params(W), target, tmp_path, spdjax.LossConfig())
    assert out["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert out["ml2r"] == pytest.approx(1.0, abs=1e-6)
    # alive by CI (> 0.1 on some held-out input): every site, the tied linear2 with its own CI function
    assert (out["n_alive/linear1"], out["n_alive/linear2"], out["n_alive/linear2.pre_identity"]) == (5, 5, 2)
    assert out["n_alive"] == 7  # n_f + n_h distinct subcomponents: the tied pair's shared ones counted once
    assert (out["n_alive_norm/linear1"], out["n_alive_norm/linear2.pre_identity"]) == (5, 2)
    assert out["n_alive_norm"] == 7
    assert (out["n_alive_gap/linear1"], out["n_alive_gap/linear2.pre_identity"]) == (5, 2)
    assert out["liveness_gap_ratio/linear1"] > 1e100  # the other 15 are exactly 0
    assert out["identity_ci_error/linear1"] == 0
    assert out["identity_ci_error/linear2"] == 0
    assert out["identity_ci_error/linear2.pre_identity"] == 0
    assert out["identity_ci_error"] == 0
    assert out["ci_l0/linear2.pre_identity"] == pytest.approx(2.0)
    assert (out["n_ci_active/linear1"], out["n_ci_active/linear2.pre_identity"]) == (5, 2)
    assert 0.0 < out["ci_l0/linear1"] < 0.25  # features active with value > 0.5 only
    assert out["target_seed"] == 7
    assert (tmp_path / "ci_one_hot.png").exists()

    # dead subcomponents keeping a small norm (liveness 0.1 on linear1, 0.028 on the identity: > 0.017)
    # but never firing: alive by norm, not by CI
    out = analyze(_perfect_params(W, residue=0.01), target, None, spdjax.LossConfig())
    assert (out["n_alive/linear1"], out["n_alive/linear2.pre_identity"], out["n_alive"]) == (5, 2, 7)
    assert (out["n_alive_norm/linear1"], out["n_alive_norm/linear2.pre_identity"]) == (6, 20)
    assert out["n_alive_norm"] == 26
    assert out["mmcs"] == pytest.approx(1.0, abs=1e-6) and out["identity_ci_error"] == 0


@pytest.mark.parametrize("name", ["tms_5-2", "tms_5-2_id", "tms_40-10", "tms_40-10_id"])
def test_paper_recipe_variant(name):
    """`:paper`: the paper's Table 1 recipe (faithfulness 1, no delta, no warm-up, 40k steps); the rest
    of the config equals the default recipe's; unknown arguments are refused."""
    main, paper = parse(load_config(name)), parse(load_config(name, "paper"))
    assert paper.method.settings.loss.coeff_dict == {"faithfulness": 1.0, **main.method.settings.loss.coeff_dict}
    assert not paper.method.settings.loss.use_delta_component and main.method.settings.loss.use_delta_component
    assert (paper.optim.steps, paper.optim.faithfulness_warmup_steps) == (40_000, 0)
    same = lambda r: (r.sites, r.identity, r.tied, r.target, r.batch_size, r.method.settings.loss.pnorm, r.optim.lr, r.optim.schedule)  # noqa: E731
    assert same(paper) == same(main)
    smoke = parse(load_config(name, "paper,smoke"))
    assert smoke.optim.steps <= 50 and smoke.optim.faithfulness_warmup_steps == 0
    assert not smoke.method.settings.loss.use_delta_component
    with pytest.raises(ValueError, match="unknown argument 'papr'"):
        load_config(name, "papr")


def test_reference_recipe_variant():
    """`:reference` (40-10 +ID only): the later PyTorch-reference recipe; other TMS configs refuse it,
    and two recipes at once are refused."""
    main, ref = parse(load_config("tms_40-10_id")), parse(load_config("tms_40-10_id", "reference"))
    assert ref.method.settings.loss.coeff_dict == {"pgd_recon_subset": 1.0, "importance_minimality": 3e-5}
    assert (ref.method.settings.ci_type, ref.method.settings.ci_hidden) == ("shared_mlp", (200,))
    assert (ref.method.settings.loss.pgd_init, ref.method.settings.loss.pgd_n_steps, ref.method.settings.loss.pgd_step_size) == ("random", 2, 0.5)
    assert ref.method.settings.loss.pgd_mask_scope == "per_example" and ref.method.settings.loss.use_delta_component
    assert ref.optim.steps == 20_000 and ref.optim.faithfulness_warmup_steps == 200
    same = lambda r: (r.sites, r.identity, r.tied, r.target, r.batch_size, r.method.settings.loss.pnorm, r.optim.lr, r.optim.schedule)  # noqa: E731
    assert same(ref) == same(main)
    assert parse(load_config("tms_40-10_id", "reference,smoke")).optim.steps <= 50
    with pytest.raises(ValueError, match=r"configs/tms_40-10.py: unknown argument 'reference'; allowed: paper, smoke"):
        load_config("tms_40-10", "reference")
    with pytest.raises(ValueError, match="at most one value of 'recipe'"):
        load_config("tms_40-10_id", "paper,reference")
