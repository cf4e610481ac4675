"""Check a refactor against an earlier commit: same exported decompositions, same step times.

    python -m experiments.compare_before_after --before=9cdddb2 [--out=runs/before_after] [--bench]

Extracts `--before` (`git archive`) into `--out/tree_<sha>`, runs the smoke configs of tms_5-2,
tms_5-2_id, resid_mlp:1 and apd_tms_5-2 with both trees (one shared target cache, so both decompose
the same cached targets) and compares every tensor of the exported decompositions bit for bit.
`--bench` then times the training step of tms_5-2 and resid_mlp:1 with both trees' benchmark,
interleaved (before, after, before, after, ...) on this host, and prints the medians.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ("configs/tms_5-2.py:smoke", "configs/tms_5-2_id.py:smoke", "configs/resid_mlp.py:1,smoke",
         "configs/apd_tms_5-2.py:smoke")
BENCH = ("configs/tms_5-2.py", "configs/resid_mlp.py")


def extract(commit: str, out: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = out / f"tree_{sha}"
    if not (tree / "launch.py").exists():
        data = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def run_config(tree: Path, config: str, workdir: Path, cache: Path) -> Path:
    cmd = [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}", f"--cache_dir={cache}",
           "--quiet", "--fresh"]
    env = {**__import__("os").environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (in {tree}) failed:\n{proc.stderr[-3000:]}")
    files = sorted((workdir / "decomposition").glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"{workdir / 'decomposition'}: expected one .safetensors file, found {files}")
    return files[0]


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two safetensors files: missing keys, shapes, dtypes, bits."""
    ta, tb = load_file(str(a)), load_file(str(b))
    diffs = [f"only in before: {k}" for k in sorted(set(ta) - set(tb))]
    diffs += [f"only in after: {k}" for k in sorted(set(tb) - set(ta))]
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            diffs.append(f"{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
        elif x.tobytes() != y.tobytes():
            diffs.append(f"{k}: max |diff| {np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))):.3g}")
    return diffs


def bench(tree: Path, config: str, cache: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "experiments.benchmark", "--_child", "--config", config, "--steps", str(steps),
           "--warmup", "5", "--cache_dir", str(cache)]
    env = {**__import__("os").environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {config} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_ms_median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--out", default="runs/before_after")
    ap.add_argument("--configs", nargs="*", default=list(SMOKE))
    ap.add_argument("--bench", action="store_true", help="also time the step of tms_5-2 and resid_mlp:1")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved benchmark rounds per tree")
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    out = (ROOT / a.out).resolve()
    before = extract(a.before, out)
    cache = out / "cache"
    failed = 0
    for config in a.configs:
        name = config.replace("configs/", "").replace(".py", "").replace(":", "_").replace(",", "_")
        fa = run_config(before, config, out / "before" / name, cache)
        fb = run_config(ROOT, config, out / "after" / name, cache)
        diffs = compare(fa, fb)
        failed += bool(diffs)
        print(f"{config}: {'bitwise equal' if not diffs else 'DIFFERENT: ' + '; '.join(diffs[:5])}", flush=True)
    if a.bench:
        times: dict = {(t, c): [] for t in ("before", "after") for c in BENCH}
        for _ in range(a.rounds):
            for c in BENCH:
                for label, tree in (("before", before), ("after", ROOT)):
                    times[(label, c)].append(bench(tree, c, cache, a.steps))
        for c in BENCH:
            b, f = statistics.median(times[("before", c)]), statistics.median(times[("after", c)])
            print(f"{c}: step median before {b:.2f} ms, after {f:.2f} ms (after/before {f / b:.3f}); "
                  f"rounds before {[round(x, 2) for x in times[('before', c)]]}, after "
                  f"{[round(x, 2) for x in times[('after', c)]]}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
