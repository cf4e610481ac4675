"""Will a job fit? Compile a config's train step ahead of time from abstract shapes (no weights
allocated, no target trained) on a (simulated) mesh, and print what XLA says it needs per device.

    python -m experiments.plan --config=configs/lm.py:llama3_8b --mesh=data=8,model=1 [--shard_target]

For each config: the mesh, the trainable parameter count, the parameter and optimiser bytes per device
(from the state's shardings), the target's frozen bytes per device, XLA's memory analysis of the
compiled step (arguments, outputs, temporaries, generated code; per device) and XLA's FLOP count per
step (per device for a sharded step), and the compile time. The family must define
`abstract_target(run) -> spdjax.Target` whose params are `jax.ShapeDtypeStruct`s (experiments/lm
does). Simulated CPU devices (`--xla_force_host_platform_device_count`, set here from the mesh before
JAX starts) compile for the CPU backend: on a pod, run it there for that backend's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time


def _parse_mesh(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or k not in ("data", "model"):
            raise SystemExit(f"--mesh: expected data=N,model=M, got {text!r}")
        out[k] = int(v)
    return out


def _bytes_per_device(tree, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = s.shard_shape(x.shape) if hasattr(s, "shard_shape") else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
    return total


def plan(config: str, mesh_axes: dict, shard_target: bool, batch_size: int | None = None) -> dict:
    """What XLA says the config's train step needs per device on that mesh (module docstring);
    `batch_size` replaces the config's (the global batch, split over `data`)."""
    import jax
    import numpy as np

    import experiments
    from spdjax import sharding
    from spdjax.config import load_config_file, parse
    from spdjax.optim import make_optimizer
    from spdjax.train import init_train_state, make_train_step

    cfg = load_config_file(config)
    if batch_size is not None:
        cfg.batch_size = batch_size
    rc = parse(cfg)
    family = experiments.family(rc.experiment)
    if not hasattr(family, "abstract_target"):
        raise SystemExit(f"{config}: family {rc.experiment!r} has no abstract_target(run); the plan needs one")
    target = family.abstract_target(rc)
    method = rc.method
    mesh = sharding.make_mesh(sharding.MeshConfig(shard_target=shard_target, **mesh_axes),
                              batch_sizes=(rc.batch_size,))
    sharding.check_batch_size(rc.batch_size, mesh)
    opt = make_optimizer(rc.optim, *method.gradient_transforms(rc.optim))

    def fresh(target):
        params = method.init_params(jax.random.key(0), target, rc.precision.param)
        return init_train_state(params, opt, jax.random.key(1))

    abstract = jax.eval_shape(fresh, target)
    shardings = sharding.state_shardings(abstract, mesh, method)
    t_shardings = sharding.target_shardings(target, mesh, shard_target)
    batch = family.abstract_batch(rc)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)), batch)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    tgt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, t_shardings)
    step = make_train_step(method, opt, rc.optim.steps, None, mesh=mesh, shardings=shardings,
                           compute_dtype=rc.precision.compute, target_shardings=t_shardings)
    t0 = time.perf_counter()
    compiled = step.lower(state, tgt, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    n_params = int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(abstract.params)))
    GiB = 2**30
    return {
        "config": config, "batch_size": rc.batch_size,
        "mesh": f"data={mesh.shape['data']} x model={mesh.shape['model']}" + (" (target sharded)" if shard_target else ""),
        "devices": f"{len(jax.devices())} {jax.devices()[0].platform}",
        "trainable_params": n_params,
        "params_gib_per_device": _bytes_per_device(abstract.params, shardings.params) / GiB,
        "opt_state_gib_per_device": _bytes_per_device(abstract.opt_state, shardings.opt_state) / GiB,
        "target_gib_per_device": _bytes_per_device(target, t_shardings) / GiB,
        "xla_argument_gib": getattr(mem, "argument_size_in_bytes", float("nan")) / GiB,
        "xla_output_gib": getattr(mem, "output_size_in_bytes", float("nan")) / GiB,
        "xla_temp_gib": getattr(mem, "temp_size_in_bytes", float("nan")) / GiB,
        "xla_code_mib": getattr(mem, "generated_code_size_in_bytes", float("nan")) / 2**20,
        "tflop_per_step_per_device": float(cost.get("flops", float("nan"))) / 1e12 if cost else float("nan"),
        "compile_s": compile_s,
    }


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--mesh", default="data=1,model=1", help="e.g. data=8,model=1 (simulated CPU devices on a CPU host)")
    ap.add_argument("--shard_target", action="store_true", help="the target's weights sharded over data (FSDP)")
    ap.add_argument("--json", action="store_true", help="one JSON object per config instead of text")
    ap.add_argument("--batch_size", type=int, default=None, help="the global batch (default: the config's)")
    ap.add_argument("--optimized_code", action="store_true",
                    help="let LLVM optimise the generated CPU code (slower compile, same memory analysis)")
    a = ap.parse_args()
    axes = _parse_mesh(a.mesh)
    n = axes.get("data", 1) * axes.get("model", 1)
    # read when JAX first initialises its backends (importing jax does not)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    # LLVM's code optimisation does not change XLA's memory analysis or FLOP count (the same numbers with
    # and without, configs/lm.py on 2 devices), and it is most of a large step's CPU compile time
    fast = "" if a.optimized_code else " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}{fast}".strip()
    for c in a.config:
        r = plan(c, axes, a.shard_target, a.batch_size)
        if a.json:
            print(json.dumps(r))
            continue
        g = lambda k: _size(r[k] * 2**30)  # noqa: E731
        print(
            f"{r['config']} (batch {r['batch_size']}) on {r['mesh']} ({r['devices']} devices): {r['trainable_params']:,} trainable params; "
            f"per device: params {g('params_gib_per_device')}, optimiser {g('opt_state_gib_per_device')}, "
            f"target {g('target_gib_per_device')}; XLA: arguments {g('xla_argument_gib')}, outputs "
            f"{g('xla_output_gib')}, temporaries {g('xla_temp_gib')}, code {_size(r['xla_code_mib'] * 2**20)}; "
            f"{r['tflop_per_step_per_device'] * 1e3:.3f} GFLOP/step/device; compiled in {r['compile_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
