"""Sharded training over a device mesh (8 simulated CPU devices, see conftest.py): the same loss,
gradients, sampled data and trained parameters as on one device; checkpoints move between meshes;
mesh config errors name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spdjax
from spdjax import sharding as sh
from spdjax.checkpoint import Checkpointer
from spdjax.config import load_config_file, parse
from spdjax.losses import LossConfig, loss_fn
from spdjax.optim import OptimConfig
from spdjax.spd import spd_optimizer
from spdjax.train import init_train_state, train

ROOT = Path(__file__).resolve().parents[2]

D, C, B = 6, 8, 32  # C divisible by the model axis (2), B by the data axis (8)
MESHES = {"data8": (8, 1), "data4_model2": (4, 2)}


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(D, 12, rngs=rngs), nnx.Linear(12, D, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


@pytest.fixture(scope="module")
def target():
    return spdjax.from_nnx(MLP(nnx.Rngs(0)), sites={"up": C, "down": C})


def batch_fn(key):
    on = jax.random.uniform(jax.random.fold_in(key, 0), (B, D)) < 0.3
    return jnp.where(on, jax.random.uniform(jax.random.fold_in(key, 1), (B, D), minval=-1, maxval=1), 0.0)


def mesh_of(name):
    data, model = MESHES[name]
    return sh.make_mesh(sh.MeshConfig(data=data, model=model))


def close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


def test_sampled_batch_is_the_same_for_any_device_count():
    assert jax.device_count() == 8 and jax.config.jax_threefry_partitionable
    key = jax.random.key(3)
    ref = jax.jit(batch_fn)(key)
    for name in MESHES:
        mesh = mesh_of(name)
        got = jax.jit(lambda k: sh.constrain_batch(batch_fn(k), mesh))(key)
        assert got.sharding.spec == P("data") and len(got.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize(
    "mesh_name,ci_type",
    [("data8", "mlp"), ("data4_model2", "mlp"), ("data4_model2", "shared_mlp"), ("data4_model2", "vector_mlp")],
)
def test_sharded_loss_and_grads_equal_single_device(target, mesh_name, ci_type):
    params = spdjax.init_decomposition(jax.random.key(0), target, ci_type, (4,))
    x = batch_fn(jax.random.key(1))
    cfg = LossConfig()
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = jax.jit(grad, static_argnums=4)(params, target, x, jax.random.key(2), cfg)

    mesh = mesh_of(mesh_name)
    psh = sh.param_shardings(params, mesh)
    rep = sh.replicated(mesh)
    f = jax.jit(grad, static_argnums=4, in_shardings=(psh, rep, sh.batch_sharding(mesh), rep),
                out_shardings=((rep, rep), psh))
    args = (sh.place(params, psh), sh.place(target, rep), sh.place(x, sh.batch_sharding(mesh)),
            jax.random.key(2))
    (loss_s, metrics_s), grads_s = f(*args, cfg)
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
    close(metrics_s, metrics, rtol=1e-5, atol=1e-7)
    close(grads_s, grads, rtol=1e-4, atol=1e-6)
    if MESHES[mesh_name][1] == 2:  # C really is split over the model axis
        u = grads_s.components["up"].U
        assert u.sharding.spec == P("model", None)
        assert u.addressable_shards[0].data.shape == (C // 2, 12)


def test_param_specs_by_role(target):
    mesh = mesh_of("data4_model2")
    for ci_type in ("mlp", "shared_mlp"):
        params = jax.eval_shape(lambda: spdjax.init_decomposition(jax.random.key(0), target, ci_type, (4, 3)))
        specs = sh.param_specs(params, mesh)
        assert specs.components["up"].U == P("model", None) and specs.components["up"].V == P(None, "model")
        ci = specs.ci["down"]
        if ci_type == "mlp":
            assert all(s == P("model", None, None) for s in ci.weights)
            assert all(s == P("model", None) for s in ci.biases)
        else:  # only the output layer maps to C
            assert ci.weights == (P(), P(), P(None, "model")) and ci.biases == (P(), P(), P("model"))
    # data-only mesh: everything replicated
    flat = jax.tree.leaves(sh.param_specs(params, mesh_of("data8")), is_leaf=lambda s: isinstance(s, P))
    assert all(s == P() for s in flat)


def test_twenty_sharded_steps_equal_unsharded(target):
    params = spdjax.init_decomposition(jax.random.key(0), target, "mlp", (4,))
    optim = OptimConfig(steps=20, lr=3e-3, faithfulness_warmup_steps=5)
    kw = dict(loss_config=LossConfig(), optim=optim, key=jax.random.key(1), batch_fn=batch_fn, log_every=20)
    ref, _ = train(target, params, **kw)
    for name in MESHES:
        mesh = mesh_of(name)
        state, hist = train(target, params, mesh=mesh, **kw)
        assert int(state.step) == 20 and np.isfinite(hist[-1].metrics["loss/total"])
        close(state.params, ref.params, rtol=1e-4, atol=2e-5)
        v = state.params.components["down"].V
        assert v.sharding.mesh.shape == dict(zip(("data", "model"), MESHES[name]))
        assert v.sharding.spec == (P(None, "model") if MESHES[name][1] == 2 else P())


def test_host_batches_path_is_sharded(target):
    params = spdjax.init_decomposition(jax.random.key(0), target, "mlp", (4,))
    optim = OptimConfig(steps=3, faithfulness_warmup_steps=0)
    batches = [np.asarray(batch_fn(jax.random.key(i))) for i in range(3)]
    kw = dict(loss_config=LossConfig(), optim=optim, key=jax.random.key(1), log_every=3)
    ref, _ = train(target, params, batches=iter(batches), **kw)
    got, _ = train(target, params, batches=iter(batches), mesh=mesh_of("data4_model2"), **kw)
    close(got.params, ref.params, rtol=1e-4, atol=1e-6)


def test_checkpoint_saved_on_one_mesh_restores_onto_another(target, tmp_path):
    params = spdjax.init_decomposition(jax.random.key(0), target, "shared_mlp", (4,))
    opt = spd_optimizer(OptimConfig(steps=5))
    state = init_train_state(params, opt, jax.random.key(7))
    src = mesh_of("data4_model2")
    state = sh.place(state, sh.state_shardings(state, src))
    # a non-trivial optimiser state: one Adam update's moments
    g = jax.tree.map(jnp.ones_like, state.params)
    _, opt_state = opt.update(g, state.opt_state, state.params)
    state = dataclasses.replace(state, opt_state=sh.place(opt_state, sh.tree_shardings(opt_state, src)))
    host = jax.device_get(state)
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(state, {"note": 1})
    ck.close()

    abstract = jax.eval_shape(lambda: state)
    for data, model in ((8, 1), (2, 2), (1, 1)):
        mesh = sh.make_mesh(sh.MeshConfig(data=data, model=model))
        want = sh.state_shardings(abstract, mesh)
        ck = Checkpointer(tmp_path / "ck")
        restored, extra = ck.restore_latest(abstract, want)
        ck.close()
        assert extra == {"note": 1}
        close(jax.device_get(restored.params), host.params, 0, 0)
        close(jax.device_get(restored.opt_state), host.opt_state, 0, 0)
        np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(host.key))
        assert int(restored.step) == 0
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
        assert restored.params.components["up"].U.sharding == NamedSharding(mesh, P("model", None) if model > 1 else P())


def _cfg(**mesh):
    cfg = load_config_file(ROOT / "configs" / "resid_mlp.py", "1,smoke")
    cfg.mesh = ml_collections.ConfigDict(mesh)
    return cfg


@pytest.mark.parametrize(
    "mesh,message",
    [
        (dict(data=-2), "config.mesh.data must be 0 (auto), -1 (all remaining devices) or an int >= 1, got -2"),
        (dict(data=0, model=-1), "config.mesh: data=0 (auto) needs a fixed model axis size"),
        (dict(model=-2), "config.mesh.model must be -1"),
        (dict(data=-1, model=-1), "config.mesh: at most one of data, model may be -1"),
        (dict(data=True), "config.mesh.data must be of type"),
        (dict(data=2, pods=2), "config.mesh: unknown field(s) ['pods']; allowed: ['data', 'model', 'shard_target']"),
    ],
)
def test_mesh_config_errors(mesh, message):
    with pytest.raises(ValueError) as e:
        parse(_cfg(**mesh))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_mesh_device_count_errors(target):
    with pytest.raises(ValueError, match=r"config.mesh: data\*model = 3\*1 = 3 does not divide the device count 8"):
        sh.make_mesh(sh.MeshConfig(data=3))
    with pytest.raises(ValueError, match="config.mesh.model=3 does not divide the device count 8"):
        sh.make_mesh(sh.MeshConfig(data=-1, model=3))
    with pytest.raises(ValueError, match="multi-process mesh must span every device"):
        sh.mesh_shape(sh.MeshConfig(data=2), 8, n_processes=2)
    assert sh.mesh_shape(sh.MeshConfig(data=-1, model=2), 8) == (4, 2)
    assert sh.make_mesh(sh.MeshConfig(data=1)).devices.size == 1
    # the default (data=0): every device, or the largest count the batch sizes divide
    assert dict(sh.make_mesh(sh.MeshConfig()).shape) == {"data": 8, "model": 1}
    assert dict(sh.make_mesh(sh.MeshConfig(), batch_sizes=(12, 12)).shape) == {"data": 4, "model": 1}
    assert dict(sh.make_mesh(sh.MeshConfig(model=2), batch_sizes=(6,)).shape) == {"data": 2, "model": 2}
    params = jax.eval_shape(lambda: spdjax.init_decomposition(jax.random.key(0), target))
    mesh = sh.make_mesh(sh.MeshConfig(data=2, model=4))
    wide = dataclasses.replace(params, components={
        k: dataclasses.replace(c, V=jax.ShapeDtypeStruct((c.V.shape[0], 6), c.V.dtype)) for k, c in params.components.items()
    })
    with pytest.raises(ValueError, match="config.mesh.model=4 does not divide C=6 of site '(up|down)'"):
        sh.param_specs(wide, mesh)
    with pytest.raises(ValueError, match="config.batch_size=12 is not divisible by the mesh's data axis size 8"):
        sh.check_batch_size(12, mesh_of("data8"))


def test_run_resumes_onto_another_mesh(tmp_path):
    """spdjax.run: stopped at step 5 on data 4 x model 2, resumed on data 8 (a mesh change is not a
    config change), ends where an uninterrupted one-device run ends."""
    from helpers import run_config as run
    from safetensors.numpy import load_file

    def cfg(**mesh):
        c = _cfg(**mesh)
        c.eval_every = 10  # held-out evaluation at the end only
        return c

    cache = tmp_path / "cache"
    run(cfg(data=1, model=1), tmp_path / "a", cache, quiet=True)
    assert run(cfg(data=4, model=2), tmp_path / "b", cache, quiet=True, stop_at_step=5) is None
    summary = run(cfg(data=8, model=1), tmp_path / "b", cache, quiet=True)
    assert summary["steps"] == 10
    a, b = (load_file(str(tmp_path / d / "decomposition" / "decomposition.safetensors")) for d in "ab")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_target_shardings_split_the_largest_divisible_axis(target):
    mesh = mesh_of("data8")
    rep = sh.target_shardings(target, mesh)
    assert all(s.spec == P() for s in jax.tree.leaves(rep))
    fsdp = sh.target_shardings(target, mesh, shard=True)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(fsdp)}
    assert all(v == P() for v in specs.values())  # (6, 12), (12, 6), (12,), (6,): no axis divisible by 8
    tree = sh.target_shardings({"w": jnp.zeros((16, 8)), "b": jnp.zeros((3,)), "e": jnp.zeros((8, 64))}, mesh, True)
    assert tree["w"].spec == P("data", None) and tree["e"].spec == P(None, "data") and tree["b"].spec == P()


def test_run_with_the_target_sharded_over_data_equals_one_device(tmp_path):
    """mesh.shard_target: the target's weights split over `data` (FSDP), the same trained decomposition."""
    from helpers import run_config as run
    from safetensors.numpy import load_file

    def cfg(**mesh):
        c = _cfg(**mesh)
        c.eval_every = 10
        return c

    cache = tmp_path / "cache"
    run(cfg(data=1, model=1), tmp_path / "a", cache, quiet=True)
    run(cfg(data=8, model=1, shard_target=True), tmp_path / "b", cache, quiet=True)
    a, b = (load_file(str(tmp_path / d / "decomposition" / "decomposition.safetensors")) for d in "ab")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
