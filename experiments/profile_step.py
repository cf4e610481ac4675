"""Where a training step's time goes: `python -m experiments.profile_step --config=configs/tms_5-2.py`.

Runs the config's jitted train step under `jax.profiler` (the same pieces as `experiments.benchmark`),
then prints the median step time and XLA's ops ranked by their exclusive time per step (time inside
an op minus the ops nested in it, e.g. a `while` loop's body), summed over threads, with each op's
output shape, operand shapes for matmuls and the JAX operation it came from. The `--top` rows and a
total per class (matmul, rng, elementwise/reduce fusion, copy, ...) say what the step is bound by.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time

_SKIP = ("$", "ThunkExecutor", "PjitFunction", "PjRt", "ParseArguments")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """`{instruction name: {shape, opcode, operands, op_name}}` from an optimised HLO module's text."""
    ops, shapes = {}, {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*?)\)(.*)$", line)
        if not m:
            continue
        name, shape, opcode, operands, rest = m.groups()
        shapes[name] = shape
        meta = re.search(r'op_name="([^"]+)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        ops[name] = dict(shape=shape, opcode=opcode, operands=re.findall(r"%([\w.\-]+)", operands),
                         op_name=meta.group(1) if meta else "", calls=calls.group(1) if calls else None)
    for op in ops.values():
        op["operand_shapes"] = [shapes.get(o, "?") for o in op["operands"]]
    return ops


def op_class(name: str, op: dict | None) -> str:
    """A coarse class for an op: matmul, rng, copy, loop, or the fusion's kind."""
    if op is None:
        return "other"
    src = op["op_name"]
    if op["opcode"] in ("dot", "convolution") or (op["opcode"] == "custom-call" and "dot" in name):
        return "matmul"
    if "threefry" in src or "random_bits" in src or "_uniform" in src:
        return "rng"
    if op["opcode"] == "copy" or name.startswith("copy"):
        return "copy"
    if op["opcode"] == "while":
        return "loop"
    if "reduce" in name:
        return "reduce fusion"
    if op["opcode"] == "fusion":
        return "elementwise fusion"
    return op["opcode"]


def exclusive_times(trace_events: list[dict]) -> dict[str, float]:
    """Exclusive duration (microseconds) per event name, nesting resolved per thread."""
    by_thread = collections.defaultdict(list)
    for e in trace_events:
        if e.get("ph") == "X" and not e["name"].startswith(_SKIP):
            by_thread[(e["pid"], e["tid"])].append(e)
    excl: dict[str, float] = collections.defaultdict(float)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                excl[stack[-1]["name"]] -= e["dur"]
            excl[e["name"]] += e["dur"]
            stack.append(e)
    return excl


def profile(config_path: str, steps: int, cache_dir: str) -> dict:
    import jax

    from experiments.benchmark import _build
    from spdjax.config import load_config_file

    state, target, step, batch, _, _ = _build(load_config_file(config_path), cache_dir, None, 1)
    compiled = step.lower(state, target, batch).compile()
    ops = hlo_ops(compiled.as_text())
    for _ in range(3):
        state, m = step(state, target, batch)
    jax.block_until_ready(state)
    wall = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, target, batch)
        jax.block_until_ready(m)
        wall.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = step(state, target, batch)
            jax.block_until_ready(state)
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    excl = {k: v / steps / 1e3 for k, v in exclusive_times(events).items()}  # ms per step
    rows = [
        dict(name=k, ms=v, cls=op_class(k, ops.get(k)), **{f: ops[k][f] for f in ("shape", "operand_shapes", "op_name")})
        if k in ops else dict(name=k, ms=v, cls="other", shape="", operand_shapes=[], op_name="")
        for k, v in excl.items()
    ]
    rows.sort(key=lambda r: -r["ms"])
    classes = collections.defaultdict(float)
    for r in rows:
        classes[r["cls"]] += r["ms"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(config=config_path, step_ms_median=statistics.median(wall) * 1e3, profiled_ms=sum(excl.values()),
                gflop_per_step=float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan"),
                classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])), ops=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cache_dir", default=".cache/targets")
    ap.add_argument("--json", default=None, help="also write the whole profile to this file")
    a = ap.parse_args()
    r = profile(a.config, a.steps, a.cache_dir)
    print(f"{r['config']}: median step {r['step_ms_median']:.2f} ms, {r['gflop_per_step']:.3f} GFLOP/step; "
          f"profiled ops {r['profiled_ms']:.2f} ms per step (summed over threads)")
    print("by class: " + ", ".join(f"{k} {v:.2f} ms ({100 * v / r['profiled_ms']:.0f}%)" for k, v in r["classes"].items()))
    for row in r["ops"][: a.top]:
        operands = " x ".join(row["operand_shapes"][:2]) if row["cls"] == "matmul" else ""
        print(f"{row['ms']:9.3f} ms  {row['cls']:18s} {row['name'][:34]:34s} {row['shape'][:28]:28s} "
              f"{operands[:48]:48s} {row['op_name'][-60:]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
