"""SPD and APD side by side on the same cached TMS targets (and, with --resid_memory, their cost on
ResidMLP 1 layer).

    python -m experiments.compare_spd_apd [--out=runs/compare] [--steps_scale=1.0] [--resid_memory]

Each run is its own `launch.py` subprocess with its own workdir under `--out` (re-running resumes or
reuses finished runs); its peak RSS is the subprocess's (`os.wait4`). Writes `--out/comparison.md`
(MMCS, ML2R, alive components by norm and by activity, wall time, peak RSS, parameter count per method) and
`--out/comparison.png` (per feature j of W, the column norm ratio ||component_c[j]|| / ||W[j]|| of
every alive SPD subcomponent / APD component: a permutation pattern of 1s is a perfect
decomposition; values below 1 are APD's shrinkage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {
    "tms_5-2": ("configs/tms_5-2.py", "configs/apd_tms_5-2.py"),
    "tms_40-10": ("configs/tms_40-10.py", "configs/apd_tms_40-10.py"),
}
DEFAULT_STEPS = {"configs/tms_5-2.py": 10_000, "configs/tms_40-10.py": 10_000,
                 "configs/apd_tms_5-2.py": 20_000, "configs/apd_tms_40-10.py": 20_000}


def launch(config: str, workdir: Path, cache_dir: str, overrides: list[str], env: dict) -> dict:
    """Run (or resume) one launch.py; returns {'peak_rss_mib', 'session_wall_s', 'returncode'}."""
    cmd = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / config}", f"--workdir={workdir}",
           f"--cache_dir={cache_dir}", "--quiet", *overrides]
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(workdir / "launch.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    info = {"peak_rss_mib": usage.ru_maxrss / 1024.0, "session_wall_s": time.perf_counter() - t0, "returncode": rc}
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {workdir / 'launch.log'}")
    return info


def run_or_reuse(config: str, workdir: Path, steps: int, cache_dir: str, env: dict, extra=()) -> dict:
    """The run's summary plus the peak RSS of the session that trained it (kept in peak_rss.json)."""
    summary_path, rss_path = workdir / "summary.json", workdir / "peak_rss.json"
    done = summary_path.exists() and json.loads(summary_path.read_text()).get("steps") == steps
    if not done:
        info = launch(config, workdir, cache_dir, [f"--config.optim.steps={steps}", *extra], env)
        prev = json.loads(rss_path.read_text()) if rss_path.exists() else {}
        info["peak_rss_mib"] = max(info["peak_rss_mib"], prev.get("peak_rss_mib", 0.0))
        rss_path.write_text(json.dumps(info))
    summary = json.loads(summary_path.read_text())
    # a run trained elsewhere (e.g. a linked workdir) has no peak_rss.json: use its own in-process figure
    summary["peak_rss_mib_process"] = (
        json.loads(rss_path.read_text())["peak_rss_mib"] if rss_path.exists() else summary.get("peak_rss_mib", float("nan"))
    )
    return summary


def spd_param_count(workdir: Path) -> int:
    import jax

    from spdjax.export import load

    return int(sum(x.size for x in jax.tree.leaves(load(workdir / "decomposition").params)))


def norm_matrix(workdir: Path, method: str, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(W kernel of linear1 (n_f, n_h), (n_f, n_alive) column-norm ratios, components sorted by feature)."""
    from spdjax import metrics

    if method == "spd":
        from spdjax.export import load

        comps = load(workdir / "decomposition").params.components["linear1"]
        norms = metrics.subcomponent_column_norms(comps)  # (C, n_f)
    else:
        from spdjax.apd.export import load

        params, _ = load(workdir / "decomposition")
        c = params.components["linear1"]
        P = np.einsum("cim,cmo->cio", np.asarray(c.A, np.float64), np.asarray(c.B, np.float64))
        norms = np.linalg.norm(P, axis=2)
    cache = json.loads((workdir / "summary.json").read_text()).get("target/cache_file")
    W = np.load(cache)["W"] if cache and Path(cache).exists() else None
    w_norm = np.linalg.norm(W, axis=0) if W is not None else np.ones(norms.shape[1])
    alive = np.flatnonzero(norms.sum(axis=1) > 0.017)
    order = sorted(alive, key=lambda c: (int(np.argmax(norms[c])), c))
    return norms[order].T / w_norm[:, None]


def figure(rows: list[tuple[str, Path, Path]], path: Path, cache_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    for i, (name, spd_dir, apd_dir) in enumerate(rows):
        for j, (method, wd) in enumerate((("SPD", spd_dir), ("APD", apd_dir))):
            ax = axes[i, j]
            try:
                M = norm_matrix(wd, method.lower(), cache_dir)
            except Exception as e:  # noqa: BLE001
                ax.set_title(f"{name} {method}: unavailable ({type(e).__name__})", fontsize=8)
                continue
            im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0, vmax=1.1)
            ax.set_title(f"{name} {method}: {M.shape[1]} alive components", fontsize=9)
            ax.set_xlabel("alive component (sorted by feature)")
            ax.set_ylabel("feature j")
            fig.colorbar(im, ax=ax, label="||comp[j]|| / ||W[:, j]||")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def alive_counts(summary: dict, method: str) -> tuple:
    """(norm count on W (the figure's), activity count) from a summary; '-' where absent.

    Norm: `n_alive_norm/linear1` (summaries written before the CI-based `n_alive` held it in
    `n_alive/linear1`). Activity: SPD `n_alive/linear1` (CI > 0.1 on some held-out input), APD `n_alive`
    (selected by its top-k on some held-out input; APD components span every site)."""
    if "n_alive_norm/linear1" not in summary:  # an older summary: n_alive was the norm count
        return summary.get("n_alive/linear1", summary.get("n_alive", "-")), "-"
    active = summary.get("n_alive/linear1") if method == "SPD" else summary.get("n_alive")
    return summary["n_alive_norm/linear1"], "-" if active is None else active


def fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def compare_tms(out: Path, scale: float, cache_dir: str, env: dict, only: list[str]) -> str:
    lines = ["| experiment | method | steps | MMCS | ML2R | alive (norm) | alive (active) | wall time (s) | peak RSS (MiB) | params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in only:
        spd_cfg, apd_cfg = PAIRS[name]
        dirs = {}
        for method, cfg in (("SPD", spd_cfg), ("APD", apd_cfg)):
            steps = max(1, int(round(DEFAULT_STEPS[cfg] * scale)))
            wd = out / f"{method.lower()}_{name}"
            dirs[method] = wd
            print(f"[compare] {method} {name}: {steps} steps in {wd}", flush=True)
            s = run_or_reuse(cfg, wd, steps, cache_dir, env)
            params = s.get("n_apd_params") if method == "APD" else spd_param_count(wd)
            norm, active = alive_counts(s, method)
            lines.append(
                f"| {name} | {method} | {steps} | {fmt(s.get('mmcs'))} | {fmt(s.get('ml2r'))} | {norm} | {active} | "
                f"{fmt(s.get('wall_time_s'), '.1f')} | {fmt(s.get('peak_rss_mib_process'), '.0f')} | {params} |"
            )
        rows.append((name, dirs["SPD"], dirs["APD"]))
    figure(rows, out / "comparison.png", cache_dir)
    return "\n".join(lines)


def _step_time(workdir: Path) -> float:
    recs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if len(recs) < 2:
        return float("nan")
    a, b = recs[-2], recs[-1]
    return (b["wall_time_s"] - a["wall_time_s"]) / max(b["step"] - a["step"], 1)


def resid_memory(out: Path, steps: int, cache_dir: str, env: dict) -> str:
    lines = ["| ResidMLP 1 layer | batch | trainable params | peak RSS (MiB) | s/step (steady) |", "|---|---|---|---|---|"]
    for method, cfg in (("SPD", "configs/resid_mlp.py:1"), ("APD", "configs/apd_resid_mlp.py:1")):
        wd = out / f"{method.lower()}_resid_mlp1_memory"
        every = max(steps // 2, 1)
        extra = [f"--config.log_every={every}", f"--config.checkpoint_every={10 * steps}", f"--config.eval_every={10 * steps}", "--fresh"]
        info = launch(cfg, wd, cache_dir, [f"--config.optim.steps={steps}", *extra], env)
        s = json.loads((wd / "summary.json").read_text())
        params = s.get("n_apd_params") if method == "APD" else spd_param_count(wd)
        from spdjax.config import parse  # noqa: F401  (batch from the saved config)

        batch = json.loads((wd / "config.json").read_text())["batch_size"]
        lines.append(f"| {method} | {batch} | {params} | {info['peak_rss_mib']:.0f} | {_step_time(wd):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--cache_dir", default=".cache/targets")
    ap.add_argument("--steps_scale", type=float, default=1.0, help="multiply every run's step count")
    ap.add_argument("--experiments", default="tms_5-2,tms_40-10")
    ap.add_argument("--resid_memory", action="store_true", help="also: SPD vs APD cost on ResidMLP 1 layer")
    ap.add_argument("--resid_steps", type=int, default=20)
    ap.add_argument("--no_tms", action="store_true", help="skip the TMS runs (e.g. with --resid_memory)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    parts = ["# SPD vs APD", ""]
    if not args.no_tms:
        parts += ["Same cached targets; each method's own recipe (configs/tms_*.py, configs/apd_tms_*.py), "
                  f"steps x {args.steps_scale}. `alive (norm)`: components with liveness > 0.017 on W (those in the "
                  "figure); `alive (active)`: SPD subcomponents of W with CI > 0.1 on some held-out input, APD "
                  "components its top-k selects on some held-out input.", "",
                  compare_tms(out, args.steps_scale, args.cache_dir, env, args.experiments.split(",")), "",
                  "![components](comparison.png)", ""]
    if args.resid_memory:
        parts += [f"{args.resid_steps} steps of each recipe (SPD batch 2048, APD batch 256):", "",
                  resid_memory(out, args.resid_steps, args.cache_dir, env), ""]
    text = "\n".join(parts)
    (out / "comparison.md").write_text(text)
    print(text)
    print(f"written {out / 'comparison.md'}" + ("" if args.no_tms else f" and {out / 'comparison.png'}"))


if __name__ == "__main__":
    main()
