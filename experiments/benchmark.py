"""Training-step benchmark: `python -m experiments.benchmark --config=configs/tms_5-2.py [--config=...]`.

SPD and APD configs alike (`configs/apd_*.py`). For each config (each in its own process, so peak
memory is per config) prints: the trainable parameter count, compile time, the median step time and steps/s after warm-up (wall and process CPU time), peak RSS, XLA's FLOP count per
step and the achieved FLOP/s, and tokens/s for sequence targets (dict batches with `tokens`). Targets are trained or loaded from the cache first (not timed).

`--devices=1,8` runs each config once per device count, sharded over a `(data, model)` mesh of that
many devices (`data` = all devices / `--mesh_model`), each in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (simulated CPU devices; on a GPU/TPU host the
count must not exceed the real devices and only selects the mesh size). XLA's FLOP count of a sharded
step is per device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time


def _build(cfg, cache_dir: str, n_devices: int | None, mesh_model: int):
    """`(state, target, step, batch, mesh)` for one config, whatever its method: the runner's pieces."""
    import jax

    import experiments
    from spdjax import sharding
    from spdjax.config import parse
    from spdjax.optim import make_optimizer
    from spdjax.train import init_train_state, make_train_step

    rc = parse(cfg)
    method = rc.method
    exp = experiments.build(rc, cache_dir)
    opt = make_optimizer(rc.optim, *method.gradient_transforms(rc.optim))
    params = method.init_params(jax.random.key(0), exp.target, rc.precision.param)
    state = init_train_state(params, opt, jax.random.key(1))
    target, mesh, shardings = exp.target, None, None
    if n_devices is not None:
        mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, model=mesh_model), jax.devices()[:n_devices])
        sharding.check_batch_size(rc.batch_size, mesh)
        shardings = sharding.state_shardings(state, mesh, method)
        state = sharding.place(state, shardings)
        target = sharding.place(target, sharding.replicated(mesh))
    batch = None
    if exp.host_data is not None:  # host-side data: time the step on one fixed batch
        batch = next(exp.host_data.train_iterator())
        batch = sharding.global_batch(batch, mesh) if mesh is not None else jax.device_put(batch)
    step = make_train_step(
        method, opt, rc.optim.steps, exp.batch_fn, mesh=mesh, shardings=shardings, compute_dtype=rc.precision.compute
    )
    return state, target, step, batch, mesh, _tokens_per_step(exp, batch)


def _tokens_per_step(exp, batch) -> int | None:
    """Tokens in one training batch for sequence targets (dict batches with `tokens`), else None."""
    import jax

    if batch is None and exp.batch_fn is not None:
        batch = jax.eval_shape(exp.batch_fn, jax.random.key(0))
    if isinstance(batch, dict) and "tokens" in batch:
        return int(batch["tokens"].size)
    return None


def matmul_gflops(n: int = 2048, reps: int = 15) -> float:
    """This host's float32 XLA matmul rate (n x n x n, median of `reps`) in GFLOP/s: the calibration line."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def bench_one(
    config_path: str, steps: int, warmup: int, cache_dir: str, n_devices: int | None = None, mesh_model: int = 1,
    calibrate: bool = False,
) -> dict:
    import jax

    from spdjax.config import load_config_file

    cfg = load_config_file(config_path)
    state, target, step, batch, mesh, tokens = _build(cfg, cache_dir, n_devices, mesh_model)
    n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

    t0 = time.perf_counter()
    compiled = step.lower(state, target, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    for _ in range(warmup):
        state, m = step(state, target, batch)
    jax.block_until_ready(state)
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        state, m = step(state, target, batch)
        jax.block_until_ready(m)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(wall)
    cal = matmul_gflops() if calibrate else None
    return {
        "matmul_gflop_s": cal,
        "fraction_of_matmul": None if cal is None else flops / 1e9 / med / cal,
        "config": config_path,
        "method": cfg.get("method", "spd"),
        "n_params": n_params,
        "compile_s": compile_s,
        "step_ms_median": med * 1e3,
        "step_ms_min": min(wall) * 1e3,
        "step_cpu_ms_median": statistics.median(cpu) * 1e3,
        "steps_per_s": 1.0 / med,
        "tokens_per_step": tokens,
        "tokens_per_s": None if tokens is None else tokens / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflop_per_step": flops / 1e9,
        "achieved_gflop_s": flops / 1e9 / med,
        "devices": str(jax.devices()),
        "malloc_tuned": __import__("spdjax").cpu_tuning.MALLOC_TUNED,
        "fast_threefry": __import__("spdjax").cpu_tuning.FAST_THREEFRY,
        "mesh": "none" if mesh is None else f"data={mesh.shape['data']} x model={mesh.shape['model']}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cache_dir", default=".cache/targets")
    ap.add_argument("--devices", default=None, help="comma-separated device counts, e.g. 1,8 (sharded runs)")
    ap.add_argument("--mesh_model", type=int, default=1, help="model (C) axis size of the mesh with --devices")
    ap.add_argument("--calibrate", action="store_true",
                    help="also time a 2048^3 float32 XLA matmul in the same process and print the step's FLOP/s as a fraction of it")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_n_devices", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(bench_one(a.config[0], a.steps, a.warmup, a.cache_dir, a._n_devices, a.mesh_model, a.calibrate)))
        return
    counts = [int(n) for n in a.devices.split(",")] if a.devices else [None]
    for c, n in [(c, n) for c in a.config for n in counts]:
        env, extra = dict(os.environ), []
        if n is not None:
            flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
            extra = ["--_n_devices", str(n), "--mesh_model", str(a.mesh_model)]
        out = subprocess.run(
            [sys.executable, "-m", "experiments.benchmark", "--_child", "--config", c,
             "--steps", str(a.steps), "--warmup", str(a.warmup), "--cache_dir", a.cache_dir, *extra,
             *(["--calibrate"] if a.calibrate else [])],
            capture_output=True, text=True, env=env,
        )
        if out.returncode != 0:
            print(f"{c}: FAILED\n{out.stderr[-3000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        where = "" if n is None else f" [{n} device(s), mesh {r['mesh']}]"
        tok = "" if r.get("tokens_per_s") is None else f", {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_step']} per step)"
        if r.get("matmul_gflop_s"):
            tok += f"; host matmul {r['matmul_gflop_s']:.1f} GFLOP/s, step at {100 * r['fraction_of_matmul']:.0f}% of it"
        print(
            f"{r['config']}{where} [{r['method']}, {r['n_params']} params]: {r['steps_per_s']:.1f} steps/s (median {r['step_ms_median']:.2f} ms, "
            f"min {r['step_ms_min']:.2f} ms, cpu {r['step_cpu_ms_median']:.2f} ms), compile {r['compile_s']:.2f} s, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, {r['gflop_per_step']:.3f} GFLOP/step, "
            f"{r['achieved_gflop_s']:.2f} GFLOP/s{tok}"
        )


if __name__ == "__main__":
    main()
