"""Speed side by side with the PyTorch reference (goodfire-ai/spd), on this host, in one run.

    bash ../shared/bench/setup-reference.sh /tmp/ref          # once: the reference in its own venv + its targets
    python -m experiments.compare_reference --reference=/tmp/ref [--threads=1,2] [--rounds=3] [--cases=tms_5-2,...]

For each case (tms_5-2, resid_mlp1, resid_mlp2: the same recipe on both sides, float32) and thread
count, the rounds alternate reference and spdjax processes, each pinned to that many cores
(`taskset`); the reference times its own training loop (`reference_step_time.py` from the bench
folder), spdjax its jitted train step (`experiments.benchmark`). Printed: the median over rounds of
each side's median step time and their ratio, with the host's float32 matmul throughput measured the
same way (XLA and torch, 2048 x 2048) as the calibration line. The reference stays out of this
project's dependencies: it only runs from `--reference`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# case -> (the reference's experiment, our config, reference steps, our steps)
CASES = {
    "tms_5-2": ("tms", "configs/tms_5-2.py", 300, 200),
    "resid_mlp1": ("resid1", "configs/resid_mlp.py", 60, 40),
    "resid_mlp2": ("resid2", "configs/resid_mlp2_reference.py", 25, 15),
}

MATMUL = {
    "xla": "from experiments.benchmark import matmul_gflops; print(matmul_gflops())\n",
    "torch": (
        "import time, statistics, sys, torch\n"
        "torch.set_num_threads(int(sys.argv[1])); n = 2048; a = torch.ones(n, n); a @ a; ts = []\n"
        "for _ in range(15):\n"
        "    t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)\n"
        "print(2 * n**3 / statistics.median(ts) / 1e9)\n"
    ),
}


def _pin(threads: int) -> list[str]:
    cores = os.sched_getaffinity(0)
    if threads > len(cores):
        raise SystemExit(f"--threads={threads}: this host lets the process use only {len(cores)} core(s)")
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cores)[:threads])]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def reference_target(ref: Path, exp: str) -> Path:
    """The reference's trained target for `exp` ("tms", "resid1", "resid2"): setup-reference.sh writes each
    as `out/train/<id>/<model>.pth` next to its `*_train_config.yaml` (its SPD runs copy them into
    out/spd/, which is not searched); the newest match wins."""
    hits = []
    for pth in (ref / "out" / "train").rglob("*.pth"):  # out/spd/ holds copies next to SPD runs
        config = "\n".join(y.read_text() for y in pth.parent.glob("*_train_config.yaml"))
        if exp == "tms":
            ok = pth.name.startswith("tms")
        else:
            ok = pth.name.startswith("resid") and re.search(rf"\bn_layers:\s*{exp[-1]}\b", config) is not None
        if ok:
            hits.append(pth)
    if not hits:
        raise SystemExit(f"no trained {exp} target (*.pth) under {ref / 'out'}: run setup-reference.sh {ref} first")
    return max(hits, key=lambda p: p.stat().st_mtime)


def time_reference(ref: Path, bench: Path, case: str, threads: int) -> dict:
    exp, _, steps, _ = CASES[case]
    env = {**os.environ, "SPD_OUT_DIR": str(ref / "out"), "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    cmd = [*_pin(threads), str(ref / "venv" / "bin" / "python"), str(bench / "reference_step_time.py"), "--exp", exp,
           "--target", str(reference_target(ref, exp)), "--steps", str(steps), "--threads", str(threads)]
    return json.loads(_run(cmd, ref / "src", env))


def time_spdjax(case: str, threads: int, cache_dir: str) -> dict:
    _, config, _, steps = CASES[case]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, the default XLA settings
    cmd = [*_pin(threads), sys.executable, "-m", "experiments.benchmark", "--_child", "--config", config,
           "--steps", str(steps), "--warmup", "5", "--cache_dir", cache_dir]
    return json.loads(_run(cmd, ROOT, env))


def matmul_gflops(ref: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {
        "xla": float(_run([*_pin(threads), sys.executable, "-c", MATMUL["xla"]], ROOT, env)),
        "torch": float(_run([*_pin(threads), str(ref / "venv" / "bin" / "python"), "-c", MATMUL["torch"], str(threads)],
                            ROOT, env)),
    }


def compare(ref: Path, bench: Path, cases: list[str], threads: list[int], rounds: int, cache_dir: str,
            log=print) -> list[dict]:
    rows = []
    for n in threads:
        cal = matmul_gflops(ref, n)
        log(f"[{n} thread(s)] float32 matmul 2048^3: XLA {cal['xla']:.1f} GFLOP/s, torch {cal['torch']:.1f} GFLOP/s")
        for case in cases:
            ref_ms, ours_ms, ours = [], [], None
            for r in range(rounds):
                ref_ms.append(time_reference(ref, bench, case, n)["step_ms_median"])
                ours = time_spdjax(case, n, cache_dir)
                ours_ms.append(ours["step_ms_median"])
                log(f"  {case} round {r + 1}: reference {ref_ms[-1]:.2f} ms, spdjax {ours_ms[-1]:.2f} ms")
            row = {
                "case": case, "threads": n, "reference_ms": statistics.median(ref_ms),
                "spdjax_ms": statistics.median(ours_ms), "reference_ms_rounds": ref_ms, "spdjax_ms_rounds": ours_ms,
                "gflop_per_step": ours["gflop_per_step"], "matmul_gflop_s": cal,
            }
            row["ratio"] = row["reference_ms"] / row["spdjax_ms"]
            row["spdjax_gflop_s"] = row["gflop_per_step"] / (row["spdjax_ms"] / 1e3)
            row["fraction_of_xla_matmul"] = row["spdjax_gflop_s"] / cal["xla"]
            rows.append(row)
            log(f"{case} [{n} thread(s)]: reference {row['reference_ms']:.2f} ms, spdjax {row['spdjax_ms']:.2f} ms: "
                f"{row['ratio']:.2f}x; spdjax {row['spdjax_gflop_s']:.1f} GFLOP/s = "
                f"{100 * row['fraction_of_xla_matmul']:.0f}% of the XLA matmul rate")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the folder setup-reference.sh installed into")
    ap.add_argument("--bench", default=str(ROOT.parent / "shared" / "bench"), help="the folder holding reference_step_time.py")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache_dir", default=".cache/targets")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; known: {list(CASES)}")
    ref, bench = Path(a.reference).resolve(), Path(a.bench).resolve()
    if not (bench / "reference_step_time.py").exists():
        raise SystemExit(f"--bench={bench}: no reference_step_time.py there")
    if not (ref / "venv" / "bin" / "python").exists():
        raise SystemExit(f"--reference={ref}: no venv/bin/python there; run setup-reference.sh {ref} first")
    print(f"host {platform.node()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = compare(ref, bench, cases, [int(t) for t in a.threads.split(",")], a.rounds, a.cache_dir,
                   log=lambda s: print(s, flush=True))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
