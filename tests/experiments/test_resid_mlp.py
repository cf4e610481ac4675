"""The ResidMLP experiment family: model, target training, the cache, configs, build/analyze."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
import spdjax
from experiments import resid_mlp
from experiments.resid_mlp import analysis, train_target
from spdjax import metrics
from spdjax.ci import CIParams
from spdjax.components import Components
from spdjax.config import load_config_file, parse
from spdjax.decomposition import SPDParams

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(n_features=6, d_mlp=4, n_layers=2, d_embed=16, steps=60, batch_size=64, feature_prob=0.1)


def load_config(arg=None):
    return load_config_file(ROOT / "configs" / "resid_mlp.py", arg)


def tiny_weights(seed=0, n_f=6, d=16, m=4, L=2):
    w = train_target.init_weights(
        jax.random.PRNGKey(seed),
        train_target.ResidMLPTargetConfig(n_features=n_f, d_mlp=m, n_layers=L, d_embed=d),
    )
    return {k: np.asarray(v) for k, v in w.items()}


# ----------------------------------------------------------------------------- model


def test_model_shapes_and_sites():
    w = tiny_weights()
    model = resid_mlp.resid_mlp_from_weights(w["W_E"], w["W_in"], w["W_out"])
    target = spdjax.from_nnx(model, sites=[("layers.*.mlp_in", 5), ("layers.*.mlp_out", 7)])
    assert target.site_names == ("layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out")
    shapes = {s.name: (s.d_in, s.d_out, s.C, s.kind) for s in target.sites}
    assert shapes["layers.1.mlp_in"] == (16, 4, 5, "linear")
    assert shapes["layers.0.mlp_out"] == (4, 16, 7, "linear")
    kernels = target.kernels()
    np.testing.assert_array_equal(kernels["layers.1.mlp_in"], w["W_in"][1])
    np.testing.assert_array_equal(kernels["layers.0.mlp_out"], w["W_out"][0])
    x = train_target.sample_features(jax.random.PRNGKey(3), 9, 6, 0.3)
    y = target(x)
    assert y.shape == (9, 6)
    expected = resid_mlp.resid_mlp_forward(w["W_E"], w["W_in"], w["W_out"], x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    # W_E is no decomposable layer: a pattern naming it matches nothing
    with pytest.raises(ValueError, match="matches no decomposable layer"):
        spdjax.from_nnx(model, sites=[("W_E", 3)])


def test_embedding_unit_norm_and_deterministic():
    E1 = np.asarray(resid_mlp.random_embedding(jax.random.PRNGKey(0), 100, 1000))
    E2 = np.asarray(resid_mlp.random_embedding(jax.random.PRNGKey(0), 100, 1000))
    E3 = np.asarray(resid_mlp.random_embedding(jax.random.PRNGKey(1), 100, 1000))
    assert E1.shape == (100, 1000) and E1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(E1, E2)
    assert not np.allclose(E1, E3)
    assert np.abs(E1 @ E1.T - np.eye(100)).max() < 0.2  # nearly orthogonal in 1000 dims


def test_sampler():
    x = jax.jit(lambda k: train_target.sample_features(k, 4096, 100, 0.01))(jax.random.PRNGKey(0))
    assert x.shape == (4096, 100) and x.dtype == jnp.float32
    assert 0.008 < float(jnp.mean(x != 0)) < 0.012
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and float(x.min()) < -0.9


# ----------------------------------------------------------------------------- target training


def test_target_training_is_deterministic():
    cfg = train_target.ResidMLPTargetConfig(**TINY)
    w1, info1 = train_target.train_resid_mlp(cfg)
    w2, _ = train_target.train_resid_mlp(cfg)
    w3, _ = train_target.train_resid_mlp(train_target.ResidMLPTargetConfig(**{**TINY, "seed": 1}))
    assert {k: v.shape for k, v in w1.items()} == {"W_E": (6, 16), "W_in": (2, 16, 4), "W_out": (2, 4, 16)}
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])
    assert not np.allclose(w1["W_in"], w3["W_in"])
    # W_E stays the fixed embedding derived from the seed
    init = tiny_weights(0)
    np.testing.assert_allclose(w1["W_E"], init["W_E"], rtol=1e-6, atol=1e-7)  # jit vs eager: ulps
    assert not np.allclose(w1["W_in"], init["W_in"])
    assert info1["final_loss"] < info1["initial_loss"]  # it learns
    assert info1["seed_used"] == 0
    # the reference's cosine: lr at step 0, 0 at the last step
    lr = train_target.cosine_lr(3e-3, 100)
    assert float(lr(0)) == pytest.approx(3e-3) and float(lr(99)) == pytest.approx(0.0, abs=1e-12)


def _fake_trainer(calls):
    def trainer(cfg):
        calls.append(cfg.seed)
        return tiny_weights(cfg.seed), {
            "seed_used": cfg.seed, "final_loss": 0.1, "initial_loss": 1.0, "train_time_s": 0.0,
            "platform": "cpu",
        }

    return trainer


def test_cache_is_reused(tmp_path):
    cfg = train_target.ResidMLPTargetConfig(**{**TINY, "seed": 2})
    calls = []
    w, info = train_target.load_or_train(cfg, tmp_path, _fake_trainer(calls))
    assert calls == [2] and not info["cached"]

    def boom(cfg):
        raise AssertionError("retrained despite the cache")

    w2, info2 = train_target.load_or_train(cfg, tmp_path, boom)
    assert info2["cached"] and info2["seed_used"] == 2
    for k in w:
        np.testing.assert_array_equal(w[k], w2[k])
    npz, sidecar = train_target.cache_paths(cfg, tmp_path)
    assert npz.name.startswith("resid_mlp-6-4x2-")
    assert json.loads(sidecar.read_text())["config"]["seed"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    other = train_target.ResidMLPTargetConfig(**{**TINY, "seed": 2, "steps": 61})
    assert train_target.cache_paths(other, tmp_path)[0] != npz
    with pytest.raises(AssertionError, match="retrained"):
        train_target.load_or_train(other, tmp_path, boom)


def test_damaged_or_wrong_shaped_cache(tmp_path):
    cfg = train_target.ResidMLPTargetConfig(**{**TINY, "seed": 2})
    train_target.load_or_train(cfg, tmp_path, _fake_trainer([]))
    npz, sidecar = train_target.cache_paths(cfg, tmp_path)
    remedy = f"delete it and {sidecar.name} to retrain the target"

    def boom(cfg):
        raise AssertionError("retrained")

    good = npz.read_bytes()
    for damaged in (good[:-20], b"garbage", b""):
        npz.write_bytes(damaged)
        with pytest.raises(ValueError) as e:
            train_target.load_or_train(cfg, tmp_path, boom)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"target cache: {str(npz)!r} is damaged"), msg
        assert msg.endswith(remedy), msg
    w = tiny_weights(2)
    np.savez(npz, **{**w, "W_E": w["W_E"][:5]})
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(cfg, tmp_path, boom)
    assert str(e.value) == (f"target cache: {str(npz)!r} has the wrong shapes: W_E (5, 16), the config needs "
                            f"(n_features, d_embed) = (6, 16); {remedy}")
    np.savez(npz, W_E=w["W_E"], W_in=w["W_in"])
    with pytest.raises(ValueError, match=r"missing \['W_out'\]"):
        train_target.load_or_train(cfg, tmp_path, boom)
    npz.write_bytes(good)
    sidecar.write_text("{")
    with pytest.raises(ValueError, match=r"target cache sidecar .* is damaged, not valid JSON .*; delete it and "):
        train_target.load_or_train(cfg, tmp_path, boom)
    # deleting the entry, as told, retrains
    npz.unlink()
    sidecar.unlink()
    calls = []
    train_target.load_or_train(cfg, tmp_path, _fake_trainer(calls))
    assert calls == [2]


def test_weights_path(tmp_path):
    missing = train_target.ResidMLPTargetConfig(**{**TINY, "weights_path": str(tmp_path / "nope.npz")})
    with pytest.raises(FileNotFoundError, match=r"config\.target\.weights_path.*nope\.npz"):
        train_target.load_or_train(missing, tmp_path)
    w = tiny_weights(5)
    np.savez(tmp_path / "mine.npz", **w)
    cfg = train_target.ResidMLPTargetConfig(**{**TINY, "weights_path": str(tmp_path / "mine.npz")})
    w2, info = train_target.load_or_train(cfg, None)
    np.testing.assert_array_equal(w2["W_in"], w["W_in"])
    assert info["platform"] == "file"
    bad = train_target.ResidMLPTargetConfig(
        **{**TINY, "d_mlp": 3, "weights_path": str(tmp_path / "mine.npz")}
    )
    with pytest.raises(ValueError, match="weights_path.*shapes") as e:
        train_target.load_or_train(bad, None)
    assert str(e.value) == (
        f"config.target.weights_path: {str(tmp_path / 'mine.npz')!r} has the wrong shapes: W_in (2, 16, 4), the "
        "config needs (n_layers, d_embed, d_mlp) = (2, 16, 3), and W_out (2, 4, 16), the config needs (n_layers, "
        "d_mlp, d_embed) = (2, 3, 16); give an .npz (numpy.savez) with arrays W_E (n_features, d_embed), W_in "
        "(n_layers, d_embed, d_mlp), W_out (n_layers, d_mlp, d_embed)"
    )
    (tmp_path / "mine.npz").write_bytes((tmp_path / "mine.npz").read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        train_target.load_or_train(cfg, None)
    assert "\n" not in str(e.value) and str(e.value).startswith(
        f"config.target.weights_path: {str(tmp_path / 'mine.npz')!r} is damaged, not a readable .npz file")
    with pytest.raises(ValueError, match="unknown field.*banana"):
        train_target.ResidMLPTargetConfig.from_section({**TINY, "banana": 1})


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "arg,L,nf,dmlp,C,hidden,lr,steps,tsteps",
    [
        (None, 1, 100, 50, 100, (16,), 2e-3, 20_000, 1_000),
        ("1", 1, 100, 50, 100, (16,), 2e-3, 20_000, 1_000),
        ("2", 2, 100, 25, 400, (16,), 1e-3, 50_000, 1_000),
        ("3", 3, 102, 17, 500, (128,), 1e-3, 50_000, 10_000),
    ],
)
def test_configs_parse(arg, L, nf, dmlp, C, hidden, lr, steps, tsteps):
    run = parse(load_config(arg))
    assert run.experiment == "resid_mlp"
    t = run.target
    assert (t.n_layers, t.n_features, t.d_mlp, t.d_embed, t.steps) == (L, nf, dmlp, 1000, tsteps)
    assert (t.batch_size, t.lr, t.feature_prob, t.weight_decay) == (2048, 3e-3, 0.01, 0.01)
    assert [(s.pattern, s.C) for s in run.sites] == [("layers.*.mlp_in", C), ("layers.*.mlp_out", C)]
    assert run.tied == () and run.identity == ()
    assert run.method.settings.loss.coeff_dict == {
        "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": 1e-5
    }
    assert run.method.settings.loss.pnorm == 2.0 and run.method.settings.loss.use_delta_component and run.method.settings.loss.n_mask_samples == 1
    assert (run.optim.steps, run.optim.lr, run.optim.schedule) == (steps, lr, "constant")
    assert run.optim.faithfulness_warmup_steps == 200
    assert (run.method.settings.ci_type, run.method.settings.ci_hidden, run.batch_size) == ("mlp", hidden, 2048)


@pytest.mark.parametrize(
    "arg,steps,minimality",
    [("1,paper", 30_000, 1e-5), ("paper,2", 50_000, 1e-5), ("3,paper", 200_000, 0.5e-5), ("paper", 30_000, 1e-5)],
)
def test_paper_recipe(arg, steps, minimality):
    """`,paper`: the SPD paper's appendix recipe, faithfulness instead of the delta component."""
    run = parse(load_config(arg))
    main = parse(load_config(str(run.target.n_layers)))
    assert run.method.settings.loss.coeff_dict == {
        "faithfulness": 1.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0,
        "importance_minimality": minimality,
    }
    assert not run.method.settings.loss.use_delta_component and run.optim.faithfulness_warmup_steps == 0
    assert run.optim.steps == steps
    # everything else as the main recipe, the target included (same cache entry)
    assert run.target == main.target and run.sites == main.sites and run.method.settings.ci_hidden == main.method.settings.ci_hidden
    assert (run.optim.lr, run.optim.schedule, run.batch_size) == (main.optim.lr, "constant", 2048)
    smoke = parse(load_config(arg + ",smoke"))
    assert smoke.optim.faithfulness_warmup_steps == 0 and not smoke.method.settings.loss.use_delta_component
    with pytest.raises(ValueError, match="paper"):
        load_config("1,papers")


@pytest.mark.parametrize("arg,L", [("1,smoke", 1), ("smoke", 1), ("3,smoke", 3)])
def test_smoke_configs_parse(arg, L):
    run = parse(load_config(arg))
    assert run.target.n_layers == L
    assert run.optim.steps <= 10 and run.batch_size <= 256 and run.target.steps <= 100
    with pytest.raises(ValueError, match=r"configs/resid_mlp.py: unknown argument .4.; allowed: paper, smoke, 1, 2, 3"):
        load_config("4")


# ----------------------------------------------------------------------------- build / analyze


def test_build_smoke(tmp_path, monkeypatch):
    run = parse(load_config("1,smoke"))
    exp = experiments.build(run, tmp_path / "cache")
    t = exp.target
    assert t.site_names == ("layers.0.mlp_in", "layers.0.mlp_out")
    assert not exp.info["cached"] and exp.info["seed_used"] == 0
    npz = next((tmp_path / "cache").glob("resid_mlp-100-50x1-*.npz"))
    with np.load(npz) as d:
        w = {k: d[k] for k in d}
    batch = jax.jit(exp.batch_fn)(jax.random.PRNGKey(1))
    assert batch.shape == (256, 100) and batch.dtype == jnp.float32
    np.testing.assert_allclose(
        t(batch[:8]), resid_mlp.resid_mlp_forward(w["W_E"], w["W_in"], w["W_out"], batch[:8]),
        rtol=1e-4, atol=1e-5,
    )

    def boom(*a, **k):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(train_target, "train_resid_mlp", boom)
    assert experiments.build(run, tmp_path / "cache").info["cached"]

    from spdjax.train import train

    params = spdjax.init_decomposition(jax.random.PRNGKey(0), t, run.method.settings.ci_type, run.method.settings.ci_hidden)
    optim = run.optim.__class__(**{**run.optim.__dict__, "steps": 2, "faithfulness_warmup_steps": 2})
    state, _ = train(t, params, run.method.settings.loss, optim, jax.random.PRNGKey(1), batch_fn=exp.batch_fn)
    out = exp.analyze(state.params, t, tmp_path / "run", run.method.settings.loss)
    json.dumps(out)
    for k in [
        "ci_l0/layers.0.mlp_in", "ci_l0/layers.0.mlp_out", "n_ci_active/layers.0.mlp_out", "n_alive/layers.0.mlp_in",
        "n_alive/layers.0.mlp_out", "n_alive", "n_alive_norm/layers.0.mlp_in", "n_alive_norm/layers.0.mlp_out",
        "n_alive_norm", "identity_ci_error/layers.0.mlp_in",
        "identity_ci_error/layers.0.mlp_out", "identity_ci_error", "identity_ci_error_tol0.2",
        "n_features_with_own_w_in", "neuron_contrib_rel_err/layers.0", "target_seed", "target_final_loss",
    ]:
        assert k in out, k
    assert all(not isinstance(v, (dict, list)) for v in out.values())
    assert 0 <= out["n_features_with_own_w_in"] <= 100
    assert out["identity_ci_error_tol0.2"] <= out["identity_ci_error"]
    pngs = sorted(p.name for p in (tmp_path / "run").glob("*.png"))
    assert pngs == ["ci_one_hot.png", "feature_recon_error.png", "neuron_contributions.png"]

    # n_alive counts by CI on the held-out batch, n_alive_norm by norm: W_in's CI switched off (output
    # bias -100) leaves its 100 subcomponents alive by norm and none alive by CI
    g = state.params.ci["layers.0.mlp_in"]
    off = CIParams(g.weights, g.biases[:-1] + (g.biases[-1] - 100.0,), g.kind)
    dead = SPDParams(state.params.components, {**state.params.ci, "layers.0.mlp_in": off})
    out2 = exp.analyze(dead, t, None, run.method.settings.loss)
    assert (out2["n_alive/layers.0.mlp_in"], out2["n_alive_norm/layers.0.mlp_in"]) == (0, 100)
    assert out2["n_alive"] == out2["n_alive/layers.0.mlp_out"] == out["n_alive/layers.0.mlp_out"]
    assert out2["n_alive_norm"] == out["n_alive_norm"] == 200


def test_neuron_contributions_of_an_exact_decomposition():
    """W_in split into one subcomponent per feature (orthonormal W_E): the SPD contributions equal the
    target's, whichever extra (zero) subcomponents there are."""
    rng = np.random.default_rng(1)
    n_f, d, m = 5, 9, 3
    W_E = np.linalg.qr(rng.normal(size=(d, n_f)))[0].T  # orthonormal rows
    K_in, K_out = rng.normal(size=(d, m)), rng.normal(size=(m, d))
    V = np.concatenate([W_E.T, np.zeros((d, 2))], axis=1)  # (d, n_f + 2)
    U = np.concatenate([W_E @ K_in, rng.normal(size=(2, m))], axis=0)
    t = resid_mlp.neuron_contributions(W_E, K_in, K_out)
    s = analysis.spd_neuron_contributions(W_E, V, U, K_out)
    assert t.shape == (n_f, m)
    np.testing.assert_allclose(s, t, atol=1e-12)
    np.testing.assert_allclose(t, (W_E @ K_in) * (K_out @ W_E.T).T)


def _ci(C, w1, b1, b2):
    """Per-subcomponent CI MLP with hidden width 1: z_c = gelu(w1 h_c + b1) + b2_c."""
    f = lambda a: jnp.asarray(a, jnp.float32)
    return CIParams(
        (f(np.full((C, 1, 1), w1)), f(np.ones((C, 1, 1)))),
        (f(np.full((C, 1), b1)), f(np.asarray(b2, np.float32).reshape(C, 1))),
        "mlp",
    )


def test_identity_ci_error_perfect_two_layers():
    """Hand-made perfect solution of a 2-layer ResidMLP: features 0, 1 own W_in subcomponents of layer 0,
    features 2, 3 of layer 1; each W_out is a dense block of d_mlp = 2 subcomponents."""
    n_f, d, m, C = 4, 8, 2, 4
    W_E = np.eye(n_f, d, dtype=np.float32)  # orthonormal rows
    W_in = np.random.default_rng(0).normal(size=(2, d, m)).astype(np.float32)
    W_out = np.zeros((2, m, d), np.float32)  # the residual stream stays x W_E: clean one-hot h
    target = spdjax.from_nnx(
        resid_mlp.resid_mlp_from_weights(W_E, W_in, W_out),
        sites=[("layers.*.mlp_in", C), ("layers.*.mlp_out", C)],
    )
    comps, ci = {}, {}
    for l in range(2):
        V = np.zeros((d, C), np.float32)
        V[:, :2] = W_E[2 * l : 2 * l + 2].T  # h_c = x_{2l+c} on the one-hot inputs
        comps[f"layers.{l}.mlp_in"] = Components(jnp.asarray(V), jnp.ones((C, m)))
        comps[f"layers.{l}.mlp_out"] = Components(jnp.ones((m, C)), jnp.ones((C, d)))
        ci[f"layers.{l}.mlp_in"] = _ci(C, 10.0, -5.0, np.zeros(C))  # 1 at h = 0.75, 0 at h = 0
        ci[f"layers.{l}.mlp_out"] = _ci(C, 0.0, 0.0, [2.0, 2.0, -1.0, -1.0])  # always on / off
    params = SPDParams(comps, ci)
    one_hot = metrics.one_hot_ci(params, target, n_f)
    key, g = analysis.w_in_ci(one_hot, ["layers.0.mlp_in", "layers.1.mlp_in"])
    assert key == "layers.*.mlp_in" and g.shape == (4, 8)
    assert metrics.identity_ci_error(g, "identity") == 0
    # per layer the pattern is not an identity (each layer holds only half the features)
    assert metrics.identity_ci_error(one_hot["layers.0.mlp_in"], "identity") > 0

    analyze = analysis.make_analyze(
        n_features=n_f, d_mlp=m, feature_prob=0.1, weights={"W_E": W_E, "W_in": W_in, "W_out": W_out},
        eval_batch_fn=lambda k: train_target.sample_features(k, 64, n_f, 0.1), seed=0,
        info={"seed_used": 3, "final_loss": 0.5},
    )
    out = analyze(params, target, None, spdjax.LossConfig())
    assert out["identity_ci_error/layers.*.mlp_in"] == 0
    assert out["identity_ci_error/layers.0.mlp_out"] == 0 and out["identity_ci_error/layers.1.mlp_out"] == 0
    assert out["identity_ci_error"] == 0 and out["identity_ci_error_tol0.2"] == 0
    assert out["n_features_with_own_w_in"] == 4
    assert out["n_features_with_own_w_in/layers.0.mlp_in"] == 2 and out["n_features_with_own_w_in/layers.1.mlp_in"] == 2
    # each layer alone holds half the features, so neither is an identity pattern; W_out = 0 writes nothing
    assert out["identity_ci_error_per_layer/layers.0.mlp_in"] > 0 and out["identity_ci_error_per_layer/layers.1.mlp_in"] > 0
    assert out["target_features_in_one_layer"] == 0 and out["target_features_split"] == 0
    assert out["ci_l0/layers.0.mlp_out"] == pytest.approx(2.0)
    assert out["target_seed"] == 3
    assert out["ci_l0_expected/layers.*.mlp_in"] == pytest.approx(0.4)  # n_f p
    assert out["ci_l0_expected/layers.0.mlp_out"] == pytest.approx(2 * (1 - 0.9**4))  # d_mlp (1-(1-p)^n_f)
    assert out["ci_l0/layers.*.mlp_in"] == pytest.approx(out["ci_l0/layers.0.mlp_in"] + out["ci_l0/layers.1.mlp_in"])
    assert out["feature_recon_mse/max"] >= out["feature_recon_mse/mean"] >= 0.0
    # a feature whose best W_in subcomponent is shared with another feature no longer counts
    g2 = g.copy()
    g2[1, 1], g2[1, 0] = 0.0, 1.0
    assert analysis.n_features_with_own_subcomponent(g2) == 2
    np.testing.assert_array_equal(analysis.own_subcomponents(g2), [-1, -1, 4, 5])  # layer 1 starts at column 4
    # the dense W_out blocks above (V = ones) are not in the neuron basis
    assert out["w_out_neuron_basis/layers.0.mlp_out/aligned"] == 0
    assert out["w_out_neuron_basis/layers.1.mlp_out/neurons"] == 0
    # W_out = 0 keeps the residual stream at x W_E, so layer 1's hidden input is ReLU(x W_E W_in[1])
    x = np.asarray(train_target.sample_features(jax.random.fold_in(jax.random.PRNGKey(0), 0x7E57), 64, n_f, 0.1))
    firing = ((x @ W_E @ W_in[1]) > 0).sum(-1).mean()
    assert out["w_out_firing_l0/layers.1.mlp_out"] == pytest.approx(firing)


def test_w_out_neuron_basis():
    """Hand-made W_out site with d_mlp = 3 neurons and C = 5 subcomponents on n_f = 4 one-hot inputs."""
    V = np.zeros((3, 5))
    V[0, 0], V[1, 1] = 2.0, -1.0  # neuron-aligned: neurons 0 and 1
    V[:, 2] = [1.0, 1.0, 0.0]  # dense (share 0.71)
    V[2, 3], V[0, 3] = 1.0, 0.2  # share 1/sqrt(1.04) = 0.98: aligned with neuron 2
    V[2, 4] = 1.0  # aligned, but never in the top k (no CI mass)
    hidden = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ci = np.zeros((4, 5))
    ci[:, 0] = [1.0, 0.0, 0.5, 0.0]  # on exactly when neuron 0 fires
    ci[:, 1] = [0.0, 1.0, 0.0, 0.3]  # fires on input 1; CI 0.3 on input 3 while silent: one error
    ci[:, 2] = [1.0, 1.0, 1.0, 1.0]  # the dense one: not counted in the neuron basis
    ci[:, 3] = [0.05, 0.0, 0.0, 0.0]  # neuron 2 fires on input 0, CI below tol
    out = analysis.w_out_neuron_basis(V, ci, hidden, k=4, tol=0.1)
    assert out == {"aligned": 3, "neurons": 3, "ci_on_silent": 1, "ci_on_firing": 3, "firing": 4}
    # k = 2 keeps the two largest CI masses (columns 2 and 0): one aligned subcomponent
    assert analysis.w_out_neuron_basis(V, ci, hidden, k=2) == {
        "aligned": 1, "neurons": 1, "ci_on_silent": 0, "ci_on_firing": 2, "firing": 2}


# ----------------------------------------------------------------------------- hand-built W_out bases


def test_w_out_basis_construction():
    """experiments.resid_mlp.w_out_basis: the gate is clip(k|h|, 0, 1) (NumPy reference), unused
    subcomponents get CI 0, both hand-built decompositions reproduce the target with every mask at 1,
    and the neuron basis is sparser than the dense block on the same inputs."""
    from experiments.resid_mlp import w_out_basis
    from spdjax.ci import ci_raw
    from spdjax.losses import clean_forward, masked_forward
    from spdjax.masks import ones_masks

    w = tiny_weights(n_f=6, d=16, m=4, L=1)
    model = resid_mlp.resid_mlp_from_weights(w["W_E"], w["W_in"], w["W_out"])
    target = spdjax.from_nnx(model, sites=[("layers.*.mlp_in", 8), ("layers.*.mlp_out", 5)])
    k = 7.0
    gate = w_out_basis.clip_abs_gate(5, np.arange(5) < 3, k, H=6)
    h = np.linspace(-0.5, 0.5, 41)
    spec = target.site("layers.0.mlp_out")
    comp = Components(V=jnp.eye(4, 5), U=jnp.zeros((5, 16)))
    a = np.zeros((41, 4), np.float32)
    a[:, :3] = h[:, None]
    z = np.asarray(ci_raw(gate, spec, jnp.asarray(a), comp))
    np.testing.assert_allclose(z[:, :3], np.clip(k * np.abs(h), 0, 1)[:, None].repeat(3, 1), atol=4 * 0.17 / w_out_basis.SHARP)
    np.testing.assert_array_equal(z[:, 3:], -1.0)

    x = train_target.sample_features(jax.random.PRNGKey(1), 64, 6, 0.3)
    out, inputs = clean_forward(target, x)
    l0 = {}
    for basis in ("neuron", "dense"):
        params = w_out_basis.build_params(target, w, basis, k=1000.0, H=16)
        ci = {s.name: ci_raw(params.ci[s.name], s, inputs[s.name], params.components[s.name]) for s in target.sites}
        pred = masked_forward(params, target, x, ones_masks(ci, use_delta=False))
        np.testing.assert_allclose(pred, out, atol=2e-4)
        l0[basis] = float(jnp.mean(jnp.sum(ci["layers.0.mlp_out"] > 0.1, axis=-1)))
        np.testing.assert_allclose(  # W_in: CI 1 exactly on the active features
            np.asarray(ci["layers.0.mlp_in"])[:, :6] > 0.5, np.asarray(x) != 0
        )
    assert l0["neuron"] < l0["dense"]


def test_layer_output_shares():
    """Hand-made 2-layer target on an orthonormal embedding: feature 0 is written by layer 0 alone,
    feature 1 by layer 1 alone, feature 2 by both, feature 3 by none."""
    n_f, m = 4, 3
    W_E = np.eye(n_f)
    W_in, W_out = np.zeros((2, n_f, m)), np.zeros((2, m, n_f))
    W_in[0, 0, 0] = W_out[0, 0, 0] = 1.0  # ReLU(x_0) -> x_0 in layer 0
    W_in[1, 1, 0] = W_out[1, 0, 1] = 1.0  # ReLU(x_1) -> x_1 in layer 1
    W_in[0, 2, 1], W_out[0, 1, 2] = 1.0, 0.25  # feature 2 in both layers; layer 1 reads the stream
    W_in[1, 2, 1], W_out[1, 1, 2] = 1.0, 0.75  # after layer 0 wrote into it
    shares = analysis.layer_output_shares(W_E, W_in, W_out, value=0.75)
    c0 = 0.75 * 0.25
    c1 = (0.75 + c0) * 0.75
    np.testing.assert_allclose(shares, [[1, 0], [0, 1], [c0 / (c0 + c1), c1 / (c0 + c1)], [0, 0]])
