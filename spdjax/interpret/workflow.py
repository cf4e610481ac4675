"""Harvest and report a finished run: `python launch.py --config=... --workdir=W --mode=report`.

`--mode=harvest` writes `W/harvest/harvest.sqlite` (resumable: `W/harvest/state.npz`); `--mode=report`
also writes `W/report.html`, a self-contained page that opens offline, harvesting first unless a
harvest of the same decomposition with the same `--harvest.*` settings is already there. The cluster
of each component is shown when `W/clustering/clusters.json` exists (`--mode=cluster`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from spdjax.clustering.cluster import group_index
from spdjax.config import parse
from spdjax.experiment import Build
from spdjax.fields import dataclass_from
from spdjax.interpret import store
from spdjax.interpret.harvest import STATE, HarvestConfig, decomposition_hash, run_harvest, write_harvest
from spdjax.interpret.report import write_report
from spdjax.metrics_writer import read_metrics
from spdjax.runner import require_decomposition
from spdjax.version import __version__
from spdjax.workdir import CONFIG_FILE, WorkdirLock, read_json

HARVEST_DIR = "harvest"
HARVEST_FILE = "harvest.sqlite"
REPORT = "report.html"
REPORT_TOP, REPORT_RANDOM = 8, 4  # examples per component in the page


def default_config() -> ml_collections.ConfigDict:
    """The `--harvest.*` settings (`HarvestConfig`)."""
    return ml_collections.ConfigDict(dataclasses.asdict(HarvestConfig()))


def harvest_config(hcfg) -> HarvestConfig:
    """The `--harvest.*` settings (any subset of `HarvestConfig`'s fields) as a checked `HarvestConfig`."""
    return dataclass_from(HarvestConfig, dict(hcfg), "harvest").validate()


def harvest_workdir(cfg, workdir: str | Path, build: Build, hcfg=None, reuse: bool = False, log=print) -> Path:
    """Harvest the run in `workdir`; returns the SQLite file. `reuse`: keep an existing harvest of the
    same decomposition and settings."""
    rc, workdir = parse(cfg), Path(workdir)
    hc = harvest_config(default_config() if hcfg is None else hcfg)
    require_decomposition(rc, workdir, "the harvest", needs_ci=True)
    path = workdir / HARVEST_DIR / HARVEST_FILE
    export = decomposition_hash(workdir / "decomposition")
    with WorkdirLock(workdir):
        if reuse and path.exists():
            meta = store.read_meta(path)
            if meta.get("export_sha256") == export and meta.get("harvest") == dataclasses.asdict(hc):
                log(f"harvest: reusing {path}")
                return path
        exp = build(rc)
        params, _ = rc.method.load(workdir / "decomposition", exp.target)
        acc = run_harvest(params, exp, rc, export, workdir / HARVEST_DIR, hc, log=log)
        meta = {"config": _read(workdir / CONFIG_FILE), "export_sha256": export, "spdjax_version": __version__,
                "summary": _read(workdir / "summary.json"),
                "eval": read_metrics(workdir / "eval.jsonl") if (workdir / "eval.jsonl").exists() else []}
        clusters = _read(workdir / "clustering" / "clusters.json")
        write_harvest(acc, params, exp, rc, meta, path, clusters.get("groups") if clusters else None)
        (workdir / HARVEST_DIR / STATE).unlink(missing_ok=True)  # written: nothing left to resume
        return path


def report_workdir(cfg, workdir: str | Path, build: Build, hcfg=None, log=print) -> Path:
    """Harvest (unless already done) and write `workdir/report.html`."""
    workdir = Path(workdir)
    path = harvest_workdir(cfg, workdir, build, hcfg, reuse=True, log=log)
    harvest = with_clusters(store.read(path), _read(workdir / "clustering" / "clusters.json"))
    return write_report(trimmed(harvest), workdir / REPORT, title=f"spdjax: {workdir.name}")


def with_clusters(harvest: dict, clusters: dict | None) -> dict:
    """The harvest with the workdir's current clustering (which may be newer than the harvest)."""
    if clusters is None:
        return harvest
    groups = clusters.get("groups", [])
    where = group_index(groups)
    harvest["meta"]["clusters"] = groups
    for c in harvest["components"]:
        c["cluster"] = where.get((c["site"], c["idx"]))
    return harvest


def trimmed(harvest: dict, top: int = REPORT_TOP, random: int = REPORT_RANDOM) -> dict:
    """The harvest with at most `top` / `random` examples per component and attention rows on the first
    top example only, so a language model's report stays one file of tens of MiB (the SQLite file
    keeps everything)."""
    for c in harvest["components"]:
        ex = c["examples"]
        ex["top"], ex["random"] = ex.get("top", [])[:top], ex.get("random", [])[:random]
        for i, e in enumerate(ex["top"] + ex["random"]):
            if i > 0 and "attention" in e:
                e["attention"] = None
    return harvest


def _read(path: Path) -> dict | None:
    return read_json(path, path.name) if path.exists() else None


def report_summary(path: Path) -> dict:
    """What launch.py prints after a harvest or report."""
    meta = store.read_meta(path if path.suffix == ".sqlite" else path.parent / HARVEST_DIR / HARVEST_FILE)
    return {"n_rows": meta["n_rows"], "harvest_seconds": meta["harvest_seconds"], "input_kind": meta["input_kind"],
            "n_components": sum(s["C"] for s in meta["sites"]), "file": str(path),
            "file_mib": round(path.stat().st_size / 2**20, 2)}

