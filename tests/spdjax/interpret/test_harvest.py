"""The harvest's accumulators against plain NumPy loops, and resuming an interrupted harvest."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from spdjax.interpret import store
from spdjax.interpret.harvest import HIST_BINS, Accumulator, HarvestConfig, Sample, accumulate, site_layer

ROOT = Path(__file__).resolve().parents[3]


def test_sample_keeps_the_k_best_rows_of_all_batches_with_their_payloads():
    rng = np.random.default_rng(0)
    k, n = 4, 6
    s = Sample(k, n, {"row": ((2,), np.int64)})
    all_scores, offset = [], 0
    for R in (3, 7, 1, 9):
        score = rng.normal(size=(R, n)).astype(np.float32)
        score[rng.random((R, n)) < 0.3] = -np.inf  # never kept
        base = offset
        cand = np.argsort(-score, axis=0, kind="stable")[:k]  # what batch_stats' top_k gives
        s.update(np.take_along_axis(score, cand, 0), cand,
                 lambda rows, cols, base=base: {"row": np.stack([rows + base, cols], 1)})
        all_scores.append(score)
        offset += R
    scores = np.concatenate(all_scores)
    for c in range(n):
        finite = np.flatnonzero(np.isfinite(scores[:, c]))
        best = finite[np.argsort(-scores[finite, c], kind="stable")][:k]
        kept = np.isfinite(s.score[:, c])
        np.testing.assert_array_equal(s.payload["row"][kept, c, 0], best)
        np.testing.assert_array_equal(s.payload["row"][kept, c, 1], c)
        np.testing.assert_allclose(s.score[kept, c], scores[best, c])


def test_accumulate_token_statistics_match_loops():
    rng = np.random.default_rng(1)
    B, T, n, V, W = 3, 9, 5, 7, 2
    cfg = HarvestConfig(tau=0.3, top_k=3, n_random=2, window=W)
    acc = Accumulator(n, cfg, None, V, heads=2)
    batches = []
    for _ in range(2):
        ci = (rng.random((B, T, n)) * (rng.random((B, T, n)) < 0.5)).astype(np.float32)
        act = rng.normal(size=(B, T, n)).astype(np.float32)
        tok = rng.integers(0, V, (B, T))
        attn = {"blk": rng.random((B, 2, T, T)).astype(np.float32)}
        accumulate(acc, ci, act, tok, None, attn, np.array(["blk"] * 2 + [""] * 3), jax.random.key(len(batches)))
        batches.append((ci, act, tok, attn["blk"]))
    A = acc.arrays
    ci_all = np.concatenate([b[0].reshape(-1, n) for b in batches])
    active = ci_all > cfg.tau
    assert int(A["rows"]) == 2 * B * T
    np.testing.assert_allclose(A["ci_sum"], ci_all.sum(0), rtol=1e-6)
    np.testing.assert_array_equal(A["n_active"], active.sum(0))
    for c in range(n):
        hist = np.zeros(HIST_BINS, int)
        for v in ci_all[:, c]:
            hist[min(int(v * HIST_BINS), HIST_BINS - 1)] += 1
        np.testing.assert_array_equal(A["hist"][c], hist)
    np.testing.assert_array_equal(A["coact"], active.T.astype(float) @ active.astype(float))
    tok_in, tok_next = np.zeros((n, V), int), np.zeros((n, V), int)
    for ci, _, tok, _ in batches:
        for b in range(B):
            for t in range(T):
                for c in range(n):
                    if ci[b, t, c] > cfg.tau:
                        tok_in[c, tok[b, t]] += 1
                        if t + 1 < T:
                            tok_next[c, tok[b, t + 1]] += 1
    np.testing.assert_array_equal(A["tok_in"], tok_in)
    np.testing.assert_array_equal(A["tok_next"], tok_next)
    # the best example of column 0: its window of tokens, CI, activations and attention row
    flat_best = int(np.argmax(ci_all[:, 0]))
    bi, rem = divmod(flat_best, B * T)
    b, t = divmod(rem, T)
    ci, act, tok, attn = batches[bi]
    for j, p in enumerate(range(t - W, t + W + 1)):
        inside = 0 <= p < T
        assert acc.top.payload["tok"][0, 0, j] == (tok[b, p] if inside else -1)
        assert acc.top.payload["ci"][0, 0, j] == (ci[b, p, 0] if inside else 0.0)
        assert acc.top.payload["act"][0, 0, j] == (act[b, p, 0] if inside else 0.0)
        np.testing.assert_array_equal(acc.top.payload["attn"][0, 0, :, j], attn[b, :, t, p] if inside else 0.0)
    # random examples are active rows only
    for c in range(n):
        kept = np.isfinite(acc.random.score[:, c])
        assert kept.sum() == min(cfg.n_random, active[:, c].sum())
        assert np.all(acc.random.payload["ci"][kept, c, W] > cfg.tau)


def test_site_layer():
    assert site_layer("blocks.1.attn.q") == 1 and site_layer("layers.0.mlp_in") == 0
    assert site_layer("linear1") is None and site_layer("linear2.pre_identity") is None


def _launch(workdir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'configs' / 'tms_5-2.py'}:smoke",
         f"--workdir={workdir}", f"--cache_dir={cache}", "--quiet", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


def _rows(path: Path) -> dict:
    con = sqlite3.connect(path)
    out = {t: sorted(con.execute(f"SELECT * FROM {t}")) for t in store.TABLES if t != "meta"}
    con.close()
    return out


def test_harvest_resumes_to_the_uninterrupted_result(tmp_path):
    run = tmp_path / "run"
    assert _launch(run, tmp_path / "cache").returncode == 0
    settings = ["--harvest.n_rows=6000", "--harvest.save_every=1"]
    full = _launch(run, tmp_path / "cache", "--mode=harvest", *settings)
    assert full.returncode == 0, full.stderr[-2000:]
    harvest = run / "harvest" / "harvest.sqlite"
    want = _rows(harvest)
    meta = store.read_meta(harvest)
    assert meta["n_rows"] >= 6000 and meta["input_kind"] == "features" and meta["harvest"]["n_rows"] == 6000
    assert not (run / "harvest" / "state.npz").exists()  # written: the resumable state is gone
    # an interrupted harvest: the state saved after its first batch, and no harvest file
    harvest.unlink()
    partial = subprocess.run(
        [sys.executable, "-c", PARTIAL, str(run), str(ROOT)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert partial.returncode == 0, partial.stderr[-2000:]
    again = _launch(run, tmp_path / "cache", "--mode=harvest", *settings)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after 1 batches" in again.stdout
    assert _rows(harvest) == want
    assert store.read_meta(harvest)["n_rows"] == meta["n_rows"]


# Writes the state a harvest of 6000 rows (save_every 1) leaves after its first batch: the first batch's
# accumulators, recomputed by a harvest of one batch's rows with the same settings otherwise.
PARTIAL = """
import importlib.util, json, sys
from pathlib import Path
import jax
import numpy as np
run, root = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, root)
import experiments
from spdjax.config import parse
from spdjax.interpret.harvest import HarvestConfig, decomposition_hash, run_harvest, save_state, state_signature
spec = importlib.util.spec_from_file_location("c", f"{root}/configs/tms_5-2.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
rc = parse(m.get_config("smoke"))
exp = experiments.build(rc, run.parent / "cache")
params, _ = rc.method.load(run / "decomposition", exp.target)
full = HarvestConfig(n_rows=6000, save_every=1)
export = decomposition_hash(run / "decomposition")
one = HarvestConfig(n_rows=rc.batch_size, save_every=1)
acc = run_harvest(params, exp, rc, export, run / "tmp_harvest", one, log=lambda s: None)
acc.cfg = full
save_state(acc, run / "harvest" / "state.npz", state_signature(export, full))
"""
