"""Device meshes and the placement of the training state and batches on them.

A run's mesh has two axes, `data` and `model` (config section `mesh: {data, model}`; -1 = every device
left over, at most one of them). Batches are sharded over `data` along their leading (batch) axis.
Parameters and their Adam moments are replicated over `data`; with `model > 1` the subcomponent axis
C of every site is sharded over `model` ("FSDP style"):

- components `U: (C, d_out)` -> `P('model', None)`, `V: (d_in, C)` -> `P(None, 'model')`;
- CI functions `mlp` / `vector_mlp` (one MLP per subcomponent): every weight `(C, fan_in, fan_out)` and
  bias `(C, fan_out)` -> `P('model', ...)`; `shared_mlp` (one MLP per site): the output layer's
  weight `(fan_in, C)` -> `P(None, 'model')` and bias `(C,)` -> `P('model')`, hidden layers replicated;
- everything else (step, PRNG key, Adam's counts) replicated; the target's frozen weights replicated,
  or with `mesh.shard_target` sharded over `data` (`target_shardings`).

A C not divisible by the `model` axis size is an error naming the site. The loss itself
(`spdjax.loss_fn`) knows nothing of this: it is jitted with these input/output shardings and XLA's
SPMD partitioner inserts the collectives. The mesh uses `AxisType.Auto` axes for that reason.

Randomness: batches and masks are drawn inside the jitted step from the global step key, with
`jax_threefry_partitionable` (the default since JAX 0.5; asserted here), so every device draws its own
slice of the *global* random arrays and the sampled data are the same for any device count. Across
hosts (`jax.distributed.initialize()`) the same holds: each process runs the same program on the
global arrays; host-side batches are assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spdjax.ci import CIParams
from spdjax.components import Components
from spdjax.decomposition import SPDParams

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes: `data` (batch) and `model` (subcomponent axis C); `shard_target`: the target's
    frozen weights sharded over `data` (`target_shardings`) instead of replicated.

    `data=0` (the default): every device not on the `model` axis, or, where the batch sizes do not
    divide that, the largest count that divides both (one process only). `-1`: all remaining devices
    (an error if the batch does not divide). A positive int: exactly that many.
    """

    data: int = 0
    model: int = 1
    shard_target: bool = False

    def __post_init__(self):
        if not isinstance(self.shard_target, bool):
            raise ValueError(f"config.mesh.shard_target must be true or false, got {self.shard_target!r}")
        for f in ("data", "model"):
            v = getattr(self, f)
            low = 0 if f == "data" else 1
            if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or v >= low):
                allowed = "0 (auto), -1 (all remaining devices)" if f == "data" else "-1 (all remaining devices)"
                raise ValueError(f"config.mesh.{f} must be {allowed} or an int >= 1, got {v!r}")
        if self.data == -1 and self.model == -1:
            raise ValueError("config.mesh: at most one of data, model may be -1")
        if self.data == 0 and self.model == -1:
            raise ValueError("config.mesh: data=0 (auto) needs a fixed model axis size")


def auto_data(cfg: MeshConfig, n_devices: int, batch_sizes: tuple[int, ...], n_processes: int = 1) -> MeshConfig:
    """`cfg` with `data=0` resolved (see MeshConfig)."""
    if cfg.data != 0:
        return cfg
    if n_devices % cfg.model:
        raise ValueError(f"config.mesh.model={cfg.model} does not divide the device count {n_devices}")
    n = n_devices // cfg.model
    if n_processes > 1:
        return dataclasses.replace(cfg, data=n)
    d = max(k for k in range(1, n + 1) if n % k == 0 and all(b % k == 0 for b in batch_sizes))
    return dataclasses.replace(cfg, data=d)


def mesh_shape(cfg: MeshConfig, n_devices: int, n_processes: int = 1) -> tuple[int, int]:
    """`(data, model)` with -1 resolved; one-line errors naming the field."""
    data, model = cfg.data, cfg.model
    if data == -1 or model == -1:
        fixed, name = (model, "model") if data == -1 else (data, "data")
        if n_devices % fixed:
            raise ValueError(f"config.mesh.{name}={fixed} does not divide the device count {n_devices}")
        data, model = (n_devices // fixed, fixed) if data == -1 else (fixed, n_devices // fixed)
    n = data * model
    if n_devices % n:
        raise ValueError(
            f"config.mesh: data*model = {data}*{model} = {n} does not divide the device count {n_devices}"
        )
    if n_processes > 1 and n != n_devices:
        raise ValueError(
            f"config.mesh: data*model = {n} but the {n_processes} processes have {n_devices} devices; "
            "a multi-process mesh must span every device (e.g. --config.mesh.data=-1)"
        )
    return data, model


def make_mesh(cfg: MeshConfig | None = None, devices=None, batch_sizes: tuple[int, ...] = ()) -> Mesh:
    """The `(data, model)` mesh for `cfg` over `devices` (default: every device of every process).

    `data=0` is resolved with `batch_sizes` (see MeshConfig). A mesh smaller than the device count uses
    the first devices. Axes are `AxisType.Auto`.
    """
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError(
            "spdjax.sharding needs jax_threefry_partitionable=True (JAX's default) for device-count "
            "independent random numbers"
        )
    devices = list(jax.devices() if devices is None else devices)
    cfg = auto_data(cfg or MeshConfig(), len(devices), tuple(batch_sizes), jax.process_count())
    data, model = mesh_shape(cfg, len(devices), jax.process_count())
    auto = (jax.sharding.AxisType.Auto,) * 2
    if data * model == len(devices):
        return jax.make_mesh((data, model), (DATA, MODEL), auto, devices=devices)
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL), axis_types=auto)


def target_shardings(target: Any, mesh: Mesh, shard: bool = False) -> Any:
    """Shardings of a `Target`'s frozen weights: replicated, or with `shard` each array's largest axis
    divisible by the `data` axis size sharded over `data` (FSDP: XLA gathers a weight where it is used;
    arrays with no such axis stay replicated). The step takes the target as an argument, so either way
    the weights are data, never constants of the compiled program."""
    rep = replicated(mesh)
    n = mesh.shape[DATA]
    if not shard or n == 1:
        return jax.tree.map(lambda _: rep, target)

    def one(x):
        shape = tuple(getattr(x, "shape", ()))
        axes = sorted((i for i, d in enumerate(shape) if d % n == 0), key=lambda i: -shape[i])
        if not axes:
            return rep
        parts = [None] * len(shape)
        parts[axes[0]] = DATA
        return NamedSharding(mesh, P(*parts))

    return jax.tree.map(one, target)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def _shard_axis(spec_len: int, axis: int) -> P:
    parts = [None] * spec_len
    parts[axis] = MODEL
    return P(*parts)


def _check_c(mesh: Mesh, C: int, site: str) -> None:
    m = mesh.shape[MODEL]
    if C % m:
        raise ValueError(
            f"config.mesh.model={m} does not divide C={C} of site {site!r} (choose a model axis size "
            f"dividing every site's C)"
        )


def param_specs(params: SPDParams, mesh: Mesh) -> SPDParams:
    """PartitionSpecs of `params` (arrays or ShapeDtypeStructs) by each leaf's role (module docstring)."""
    shard = mesh.shape[MODEL] > 1
    comps = {}
    for site, c in params.components.items():
        if shard:
            _check_c(mesh, c.V.shape[-1], site)
        comps[site] = Components(V=P(None, MODEL) if shard else P(), U=P(MODEL, None) if shard else P())
    ci = {}
    for site, p in params.ci.items():
        if not shard:
            ci[site] = CIParams(tuple(P() for _ in p.weights), tuple(P() for _ in p.biases), p.kind)
            continue
        if p.kind == "shared_mlp":  # the output layer maps to C
            last = len(p.weights) - 1
            _check_c(mesh, p.weights[last].shape[-1], site)
            ws = tuple(_shard_axis(2, 1) if i == last else P() for i in range(len(p.weights)))
            bs = tuple(P(MODEL) if i == last else P() for i in range(len(p.biases)))
        else:  # one MLP per subcomponent: C leads every weight and bias
            _check_c(mesh, p.weights[0].shape[0], site)
            ws = tuple(_shard_axis(w.ndim, 0) for w in p.weights)
            bs = tuple(_shard_axis(b.ndim, 0) for b in p.biases)
        ci[site] = CIParams(ws, bs, p.kind)
    return SPDParams(comps, ci)


def _named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params: SPDParams, mesh: Mesh) -> SPDParams:
    return _named(mesh, param_specs(params, mesh))


def tree_shardings(tree: Any, mesh: Mesh, params_type: type = SPDParams, specs=param_specs) -> Any:
    """Shardings for any pytree holding `params_type` subtrees (params, Adam's mu/nu): those by
    `specs(subtree, mesh)` (PartitionSpecs), every other leaf replicated."""
    rep = replicated(mesh)

    def one(x):
        if isinstance(x, params_type):
            return _named(mesh, specs(x, mesh))
        return rep

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, params_type))


def state_shardings(state, mesh: Mesh, method=None):
    """Shardings of a `TrainState` (or its abstract `jax.eval_shape` twin): params and the optimiser
    state by the method's `param_specs` (default: SPD's, by role), step and key replicated."""
    if method is None:
        return tree_shardings(state, mesh)
    return tree_shardings(state, mesh, method.params_type, method.param_specs)


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of `tree` on its sharding (`shardings`: one Sharding, or a tree like `tree`).

    Global arrays are resharded with `jax.device_put`. Host values (NumPy, or JAX arrays local to this
    process) are taken as the same on every process and assembled into global arrays, which also works
    across hosts. PRNG key arrays are placed through their raw key data.
    """

    def one(x, s):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def global_batch(batch: Any, mesh: Mesh) -> Any:
    """A host-side batch as global arrays sharded over `data`.

    With one process `batch` is the global batch; with several, each process passes its own slice
    (process-local rows, in process order) and the global batch is their concatenation.
    """
    s = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(s, np.asarray(x)), batch)


def constrain_batch(batch: Any, mesh: Mesh) -> Any:
    """Inside jit: the batch axis over `data` (so a batch sampled in the step is sampled sharded)."""
    return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def check_batch_size(n: int, mesh: Mesh, field: str = "batch_size") -> None:
    d = mesh.shape[DATA]
    if n % d:
        raise ValueError(f"config.{field}={n} is not divisible by the mesh's data axis size {d}")


def to_host(tree: Any, mesh: Mesh | None = None) -> Any:
    """NumPy copies of a (possibly sharded, possibly multi-host) tree, on every process."""
    if mesh is not None and jax.process_count() > 1:
        tree = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.device_get(tree)


def describe(mesh: Mesh) -> str:
    return (
        f"mesh data={mesh.shape[DATA]} x model={mesh.shape[MODEL]} over {mesh.devices.size} of "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} process(es)"
    )


def n_devices(mesh: Mesh) -> int:
    return math.prod(mesh.devices.shape)
