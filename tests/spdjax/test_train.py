"""Optimisation: LR schedules, per-group clipping, the faithfulness warm-up, the train loop, and both
training recipes (paper and reference-main) expressed through config."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import spdjax
from spdjax import config as config_lib
from spdjax.ci import CIParams
from spdjax.components import Components, faithfulness_loss
from spdjax.decomposition import SPDParams
from spdjax.losses import LossConfig
from spdjax.optim import OptimConfig, make_schedule
from spdjax.spd import clip_by_group, faithfulness_warmup, spd_optimizer
from spdjax.train import train

N_F, N_H = 5, 2


class TMS(nnx.Module):
    """x -> relu(x W^T W + b): enc.kernel = W^T (5, 2), dec.kernel = W (2, 5)."""

    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(N_F, N_H, use_bias=False, rngs=rngs)
        self.dec = nnx.Linear(N_H, N_F, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.dec(self.enc(x)))


def make_tms(seed=0):
    """TMS with numpy weights (no compiled initialisers): unit-norm feature directions, b < 0."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: TMS(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    angles = 2 * np.pi * np.arange(N_F) / N_F + 0.1 * rng.normal(size=N_F)
    W = np.stack([np.cos(angles), np.sin(angles)]).astype(np.float32)  # (2, 5)
    model.enc.kernel[...] = jnp.asarray(W.T)
    model.dec.kernel[...] = jnp.asarray(W)
    model.dec.bias[...] = jnp.full((N_F,), -0.3, jnp.float32)
    return model


def random_params(target, seed=0):
    """Reference-init-like SPD params, built in numpy (shapes from eval_shape)."""
    shapes = jax.eval_shape(spdjax.init_decomposition, jax.random.key(0), target)
    rng = np.random.default_rng(seed)

    def fill(s):
        fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
        return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(max(fan_in, 1)), s.dtype)

    p = jax.tree.map(fill, shapes)
    ci = {n: CIParams(c.weights, tuple(jnp.zeros_like(b) for b in c.biases), c.kind) for n, c in p.ci.items()}
    return SPDParams(p.components, ci)


def batch_fn(key, n=32):
    """Sparse features: each on with probability 0.2, magnitude U(0, 1)."""
    ka, kb = jax.random.split(key)
    return jax.random.uniform(ka, (n, N_F)) * jax.random.bernoulli(kb, 0.2, (n, N_F))


# ----------------------------------------------------------------------------- schedules


def _lr(cfg, steps):
    return np.asarray(make_schedule(cfg)(jnp.asarray(steps)))


def test_constant_schedule_with_warmup():
    cfg = OptimConfig(steps=100, lr=2.0, schedule="constant", warmup_frac=0.1)
    np.testing.assert_allclose(_lr(cfg, [0, 5, 10, 50, 99, 100]), [0.0, 1.0, 2.0, 2.0, 2.0, 2.0], rtol=1e-6)
    cfg = OptimConfig(steps=100, lr=2.0, schedule="constant")
    np.testing.assert_allclose(_lr(cfg, [0, 99]), [2.0, 2.0], rtol=1e-6)


def test_linear_schedule_with_warmup():
    cfg = OptimConfig(steps=100, lr=1.0, schedule="linear", warmup_frac=0.1, final_lr_frac=0.1)
    # warm-up 0 -> 1 over 10 steps, then 1 -> 0.1 over the remaining 90
    np.testing.assert_allclose(
        _lr(cfg, [0, 4, 10, 55, 100]), [0.0, 0.4, 1.0, 1.0 - 0.9 * 45 / 90, 0.1], rtol=1e-5, atol=1e-7
    )
    cfg = OptimConfig(steps=50, lr=1e-3, schedule="linear")
    np.testing.assert_allclose(_lr(cfg, [0, 25, 50]), [1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-9)


def test_cosine_schedule_with_warmup():
    cfg = OptimConfig(steps=100, lr=1.0, schedule="cosine", warmup_frac=0.1, final_lr_frac=0.1)

    def cos(t):  # t steps after the warm-up, 90 decay steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 90))

    np.testing.assert_allclose(
        _lr(cfg, [0, 5, 10, 40, 55, 100]), [0.0, 0.5, 1.0, cos(30), cos(45), 0.1], rtol=1e-5, atol=1e-7
    )
    assert abs(cos(30) - 0.775) < 1e-9 and abs(cos(45) - 0.55) < 1e-9
    cfg = OptimConfig(steps=40, lr=1.0, schedule="cosine")
    np.testing.assert_allclose(_lr(cfg, [0, 20, 40]), [1.0, 0.5, 0.0], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- clipping


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _grads(norm_comp, norm_ci):
    """Gradients with the given global norms of the components and the CI functions (numpy-built)."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    comps = {"a": Components(V=f(4, 3), U=f(3, 2)), "b": Components(V=f(2, 3), U=f(3, 5))}
    ci = {"a": CIParams((f(3, 1, 4), f(3, 4, 1)), (f(3, 4), f(3, 1)), "mlp")}
    nc, ni = _norm(comps), _norm(ci)
    comps = jax.tree.map(lambda g: jnp.asarray(g * (norm_comp / nc)), comps)
    ci = jax.tree.map(lambda g: jnp.asarray(g * (norm_ci / ni)), ci)
    return SPDParams(comps, ci)


def test_clip_by_group_clips_components_and_ci_independently():
    tx = clip_by_group(1.0, 2.0)
    update = jax.jit(lambda g: tx.update(g, tx.init(g))[0])
    grads = _grads(10.0, 0.5)  # components too large, CI small
    assert _norm(grads.components) == pytest.approx(10.0, rel=1e-5)
    out = update(grads)
    assert _norm(out.components) == pytest.approx(1.0, rel=1e-5)
    assert _norm(out.ci) == pytest.approx(0.5, rel=1e-5)  # untouched: below its own threshold
    # clipping rescales, it keeps the direction
    np.testing.assert_allclose(out.components["b"].U, grads.components["b"].U / 10.0, rtol=1e-5)
    np.testing.assert_array_equal(out.ci["a"].weights[0], grads.ci["a"].weights[0])

    grads = _grads(0.5, 10.0)  # the other way round
    out = update(grads)
    assert _norm(out.components) == pytest.approx(0.5, rel=1e-5)
    assert _norm(out.ci) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_array_equal(out.components["a"].V, grads.components["a"].V)

    tx = clip_by_group(None, None)
    out = jax.jit(lambda g: tx.update(g, tx.init(g))[0])(grads)
    assert _norm(out.components) == pytest.approx(0.5, rel=1e-5)
    assert _norm(out.ci) == pytest.approx(10.0, rel=1e-5)


def test_make_optimizer_applies_the_clipping():
    grads = _grads(10.0, 10.0)
    opt = spd_optimizer(OptimConfig(steps=10, lr=1.0, schedule="constant", clip_components=1.0))
    # Adam's first step is sign-like, so compare the clipped and unclipped groups through the state:
    # the first moment after one step is (1 - b1) * clipped gradient.
    state = opt.init(grads)
    _, state = jax.jit(opt.update)(grads, state, grads)
    mu = state[1][0].mu
    assert _norm(mu.components) == pytest.approx(0.1 * 1.0, rel=1e-4)
    assert _norm(mu.ci) == pytest.approx(0.1 * 10.0, rel=1e-4)


# ----------------------------------------------------------------------------- faithfulness warm-up


def _faith(params, target):
    return float(faithfulness_loss(params.components, target.kernels(), target.sites))


def test_faithfulness_warmup_reduces_faithfulness_loss():
    target = spdjax.from_nnx(
        make_tms(), {"enc": 5, "dec": 5}, tied={"dec": "enc"}, identity={"dec": 3}
    )
    params = random_params(target)
    before = _faith(params, target)
    cfg = OptimConfig(steps=1, faithfulness_warmup_steps=200)
    warmed = faithfulness_warmup(params, target, cfg)
    after = _faith(warmed, target)
    assert after < 0.05 * before, (before, after)
    # every primary site improved, the identity included; CI functions are untouched
    k = target.kernels()
    for n, c in params.components.items():
        w = warmed.components[n]
        err0 = float(jnp.sum((k[n] - c.V @ c.U) ** 2))
        err1 = float(jnp.sum((k[n] - w.V @ w.U) ** 2))
        assert err1 < 0.1 * err0, (n, err0, err1)
    assert set(warmed.components) == {"enc", "dec.pre_identity"}
    for a, b in zip(jax.tree.leaves(params.ci), jax.tree.leaves(warmed.ci)):
        np.testing.assert_array_equal(a, b)
    # zero warm-up steps: nothing happens
    assert faithfulness_warmup(params, target, OptimConfig(steps=1, faithfulness_warmup_steps=0)) is params


# ----------------------------------------------------------------------------- recipes and the loop


def run_config(recipe: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "tms"
    cfg.seed = 0
    cfg.sites = (("enc", 5), ("dec", 5))
    cfg.tied = (("dec", "enc"),)
    cfg.ci = ml_collections.ConfigDict({"type": "mlp", "hidden": (8,)})
    coeffs = {"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": 3e-3}
    if recipe == "paper":
        coeffs = {"faithfulness": 1.0, **coeffs}
    cfg.loss = ml_collections.ConfigDict(
        {"coeffs": coeffs, "n_mask_samples": 1, "use_delta_component": recipe != "paper"}
    )
    cfg.optim = ml_collections.ConfigDict(
        {
            "steps": 30,
            "lr": 1e-2,
            "schedule": "cosine",
            "warmup_frac": 0.1,
            "final_lr_frac": 0.1,
            "faithfulness_warmup_steps": 0 if recipe == "paper" else 200,
        }
    )
    cfg.batch_size = 32
    cfg.log_every = 7
    return cfg


@pytest.mark.parametrize("recipe", ["paper", "reference-main"])
def test_recipe_parses_trains_and_logs_only_on_log_steps(recipe):
    rc = config_lib.parse(run_config(recipe))
    if recipe == "paper":
        assert rc.method.settings.loss.use_delta_component is False
        assert rc.method.settings.loss.coeff_dict["faithfulness"] == 1.0
        assert rc.optim.faithfulness_warmup_steps == 0
    else:
        assert rc.method.settings.loss.use_delta_component is True
        assert "faithfulness" not in rc.method.settings.loss.coeff_dict
        assert rc.optim.faithfulness_warmup_steps == 200
    target = spdjax.from_nnx(make_tms(), rc.sites, tied=dict(rc.tied))
    params = random_params(target)
    traces = []

    def sample(key):
        traces.append(1)  # runs only while tracing the step
        return batch_fn(key, rc.batch_size)

    seen = []
    state, history = train(
        target, params, rc.method.settings.loss, rc.optim, jax.random.key(rc.seed), batch_fn=sample,
        log_every=rc.log_every, on_log=seen.append,
    )
    assert int(state.step) == 30
    assert len(traces) == 1  # one compilation for the whole run
    assert [r.step for r in history] == [7, 14, 21, 28, 30]
    assert seen == history
    walls = [r.wall_time_s for r in history]
    assert walls == sorted(walls)
    first, last = history[0].metrics, history[-1].metrics
    assert ("loss/faithfulness" in first) == (recipe == "paper")
    assert {"loss/stochastic_recon", "loss/stochastic_recon_layerwise", "loss/importance_minimality"} <= set(first)
    assert {"ci_l0/enc", "ci_l0/dec", "lr", "grad_norm/components", "grad_norm/ci"} <= set(first)
    for rec in history:
        assert all(np.isfinite(v) for v in rec.metrics.values()), rec
    if recipe == "paper":
        # from random components the loss (faithfulness-dominated here) goes down
        assert last["loss/total"] < 0.8 * first["loss/total"], (first["loss/total"], last["loss/total"])
        assert last["loss/faithfulness"] < 0.8 * first["loss/faithfulness"]
    # the LR in the metrics follows the schedule (metrics of step s are computed at step index s - 1)
    sched = make_schedule(rc.optim)
    for rec in history:
        assert rec.metrics["lr"] == pytest.approx(float(sched(rec.step - 1)), rel=1e-5)
    if recipe == "reference-main":
        # the faithfulness warm-up ran before the main loop: U V is close to the target
        assert _faith(state.params, target) < 0.1 * _faith(params, target)


def test_train_leaves_the_callers_params_usable():
    """`train` returns new params; the arrays the caller passed in must stay valid (no donation of them)."""
    target = spdjax.from_nnx(make_tms(), {"enc": 2, "dec": 2}, tied={"dec": "enc"})
    params = random_params(target)
    before = jax.tree.map(lambda x: np.array(x, copy=True), params)
    cheap = LossConfig(coeffs=(("faithfulness", 1.0), ("importance_minimality", 1e-3)))
    state, _ = train(
        target, params, cheap, OptimConfig(steps=2), jax.random.key(0), batch_fn=batch_fn, log_every=1
    )
    deleted = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params) if x.is_deleted()]
    assert not deleted, f"train() deleted (donated) the caller's params: {deleted}"
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(state.params.components["enc"].V), before.components["enc"].V)


def test_train_needs_exactly_one_data_source():
    target = spdjax.from_nnx(make_tms(), {"enc": 2})
    params = random_params(target)
    with pytest.raises(ValueError, match="batch_fn"):
        train(target, params, LossConfig(), OptimConfig(steps=1), jax.random.key(0))
    with pytest.raises(ValueError, match="batch_fn"):
        train(
            target, params, LossConfig(), OptimConfig(steps=1), jax.random.key(0),
            batch_fn=batch_fn, batches=iter([]),
        )


# ----------------------------------------------------------------------------- precision policy


def test_bf16_compute_keeps_float32_master_weights():
    """compute_dtype=bfloat16: the loss runs in bf16 while the optimiser updates float32 parameters;
    the first step's loss matches float32 compute to bf16 precision."""
    from spdjax.spd import SPD
    from spdjax.train import init_train_state, make_train_step

    target = spdjax.from_nnx(make_tms(), {"enc": 5, "dec": 5}, tied={"dec": "enc"})
    params = random_params(target)
    method = SPD.with_loss(LossConfig())
    opt = spd_optimizer(OptimConfig(steps=3, faithfulness_warmup_steps=0))
    fresh = lambda: init_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))  # noqa: E731
    f32, m32 = make_train_step(method, opt, 3, batch_fn)(fresh(), target)
    b16, m16 = make_train_step(method, opt, 3, batch_fn, compute_dtype=jnp.bfloat16)(fresh(), target)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.params))
    assert all(v.dtype == jnp.float32 for v in m16.values())
    # deterministic terms agree to bf16 precision; the masks' uniform draws are bf16 too, so the
    # stochastic terms see other random numbers and agree only roughly
    assert float(m16["loss/importance_minimality"]) == pytest.approx(float(m32["loss/importance_minimality"]), rel=2e-2)
    assert float(m16["loss/total"]) == pytest.approx(float(m32["loss/total"]), rel=0.25)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(b16.params), jax.tree.leaves(params))]
    assert max(moved) > 0  # the float32 master weights were updated
    # the bf16 step really computes in bf16: its loss differs from the float32 one in the low bits
    assert float(m16["loss/total"]) != float(m32["loss/total"])


def test_precision_config_is_validated():
    cfg = run_config("paper")
    cfg.precision = ml_collections.ConfigDict({"param_dtype": "float32", "compute_dtype": "bfloat16"})
    rc = config_lib.parse(cfg)
    assert rc.precision.compute == jnp.bfloat16 and rc.precision.param == jnp.float32
    cfg.precision.compute_dtype = "float32"
    assert config_lib.parse(cfg).precision.compute is None  # nothing to cast
    cfg.precision.compute_dtype = "int8"
    with pytest.raises(ValueError, match=r"config.precision.compute_dtype: unknown 'int8'; allowed: \['float32', 'bfloat16', 'float16'\]"):
        config_lib.parse(cfg)
