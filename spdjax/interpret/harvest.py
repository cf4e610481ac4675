"""Harvest: one pass over held-out data collecting what a researcher looks at per subcomponent
(interpretation.md), resumable, written to SQLite (`spdjax.interpret.store`).

Every subcomponent of every site is one column (sites in the target's order). Per batch, on the
device: each site's input (clean forward), CI (lower leaky) and inner activation x V_c. On the host,
per column: the CI sum, the count of rows with CI > tau, a CI histogram, the `top_k` rows by CI and a
uniform sample of `n_random` of its active rows (bottom-k of random keys: a reservoir sample), with
their payloads (token inputs: the window of +-`window` tokens, the CI and inner activation on it and,
for attention sites, the example token's attention row; feature inputs: the input vector), the
co-activation counts with every other column and, for token inputs, the counts of the input token
and of the next token at its active positions.

Resumable: the accumulators are saved every `save_every` batches (`harvest/state.npz`, atomically)
with the batch index, the decomposition's hash and the harvest settings; a restart with the same
three continues, anything else starts over (and says so). The state is deleted once the SQLite file
is written (`finish`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from spdjax import metrics, sharding
from spdjax.clustering.cluster import group_index
from spdjax.clustering.mdl import coactivations
from spdjax.components import site_components
from spdjax.interpret import store
from spdjax.losses.forward import clean_forward, compute_ci
from spdjax.runner import held_out_stream
from spdjax.sites import inner_acts

STATE = "state.npz"
HIST_BINS = 20
MAX_WEIGHT = 48
ATTENTION_EXAMPLES = 3  # attention rows are stored for the top examples of these ranks only


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
    """n_rows: rows to harvest (inputs, or token positions), at most; tau: the activity threshold;
    top_k / n_random: examples kept per subcomponent; window: tokens each side of a token example;
    n_tokens: input/next tokens kept per subcomponent; n_coactive: co-active others kept; save_every:
    batches between saved states; one_hot_value: the toys' one-hot input scale."""

    n_rows: int = 100_000
    tau: float = 0.1
    top_k: int = 16
    n_random: int = 8
    window: int = 20
    n_tokens: int = 40
    n_coactive: int = 12
    save_every: int = 20
    one_hot_value: float = 0.75
    seed: int = 0

    def validate(self) -> "HarvestConfig":
        for f in ("n_rows", "top_k", "n_random", "n_tokens", "n_coactive", "save_every"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"harvest.{f} must be >= 1, got {getattr(self, f)}")
        if self.window < 0 or not 0 <= self.tau < 1:
            raise ValueError(f"harvest.window must be >= 0 and harvest.tau in [0, 1), got {self.window}, {self.tau}")
        return self


def site_layer(name: str) -> int | None:
    """The layer of a site: the first integer in its dotted name (`blocks.1.attn.q` -> 1), else None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def decomposition_hash(path: Path) -> str:
    """sha256 of the export's JSON (which records every tensor's sha256)."""
    return hashlib.sha256((Path(path) / "decomposition.json").read_bytes()).hexdigest()


def _site_arrays(params, target, batch, sigmoid: str):
    _, inputs = clean_forward(target, batch)
    ci = compute_ci(params, target, inputs, sigmoid).lower
    acts = {s.name: inner_acts(s, inputs[s.name], site_components(params.components, s).V) for s in target.sites}
    cat = lambda d: jnp.concatenate([d[s.name] for s in target.sites], axis=-1)  # noqa: E731
    return cat(ci), cat(acts)


_site_arrays_jit = jax.jit(_site_arrays, static_argnames="sigmoid")


@partial(jax.jit, static_argnames=("top_k", "n_random"))
def batch_stats(ci: Float[Array, "*lead n"], tau: float, top_k: int, n_random: int, key: Array) -> dict[str, Array]:
    """One batch's reductions per column, on the device: `ci_sum`, `n_active` (CI > tau), `hist` `(n, bins)`,
    and the candidate rows of the two samples: `top` (the `top_k` largest CI) and `random` (the `n_random`
    smallest of uniform keys drawn from `key` over the active rows; -inf scores where too few are active)."""
    flat = ci.reshape(-1, ci.shape[-1])
    R, n = flat.shape
    active = flat > tau
    bins = jnp.clip((flat * HIST_BINS).astype(jnp.int32), 0, HIST_BINS - 1)
    hist = jax.ops.segment_sum(jnp.ones(R * n, jnp.int32), (jnp.arange(n)[None, :] * HIST_BINS + bins).ravel(),
                               num_segments=n * HIST_BINS).reshape(n, HIST_BINS)
    keys = jnp.where(active, -jax.random.uniform(key, (R, n)), -jnp.inf)
    top_val, top_row = jax.lax.top_k(flat.T, min(top_k, R))
    rnd_val, rnd_row = jax.lax.top_k(keys.T, min(n_random, R))
    return {"ci_sum": flat.sum(0, dtype=jnp.float32), "n_active": active.sum(0), "hist": hist,
            "top": (top_val.T, top_row.T), "random": (rnd_val.T, rnd_row.T)}


class Sample:
    """The k rows with the largest score per column, with per-slot payload arrays `(k, n, ...)`."""

    def __init__(self, k: int, n: int, fields: dict[str, tuple[tuple[int, ...], Any]]):
        self.score = np.full((k, n), -np.inf, np.float32)
        self.payload = {f: np.zeros((k, n, *shape), dtype) for f, (shape, dtype) in fields.items()}

    def update(self, cand_score: np.ndarray, cand: np.ndarray,
               make: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]) -> None:
        """cand_score, cand: `(kk, n)` this batch's best scores per column and their rows (-inf: never
        kept; `batch_stats`); make(rows, cols) -> the payloads of those rows."""
        k = self.score.shape[0]
        both = np.concatenate([self.score, cand_score.astype(np.float32)])
        order = np.argsort(-both, axis=0, kind="stable")[:k]
        new_score = np.take_along_axis(both, order, 0)
        old = np.minimum(order, k - 1)
        for f, a in self.payload.items():
            idx = old.reshape(old.shape + (1,) * (a.ndim - 2))
            self.payload[f] = np.take_along_axis(a, idx, 0)
        slot, col = np.nonzero((order >= k) & np.isfinite(new_score))
        if slot.size:
            rows = cand[order[slot, col] - k, col]
            for f, v in make(rows, col).items():
                self.payload[f][slot, col] = v
        self.score = new_score

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}score": self.score, **{f"{prefix}{f}": a for f, a in self.payload.items()}}

    def load(self, prefix: str, state) -> None:
        self.score = state[f"{prefix}score"]
        self.payload = {f: state[f"{prefix}{f}"] for f in self.payload}


class Accumulator:
    """Everything the harvest keeps, as arrays (so the state saves and restores exactly)."""

    def __init__(self, n: int, cfg: HarvestConfig, feature_dim: int | None, vocab: int | None, heads: int | None):
        """Token inputs when `vocab` is given (`heads`: attention rows kept), else feature vectors of
        `feature_dim`."""
        self.cfg = cfg
        self.arrays = {"rows": np.zeros((), np.int64), "batches": np.zeros((), np.int64), "seconds": np.zeros(()),
                       "ci_sum": np.zeros(n), "n_active": np.zeros(n, np.int64),
                       "hist": np.zeros((n, HIST_BINS), np.int64), "coact": np.zeros((n, n))}
        W = 2 * cfg.window + 1
        if vocab is not None:
            fields = {"tok": ((W,), np.int32), "ci": ((W,), np.float32), "act": ((W,), np.float32)}
            if heads:
                fields["attn"] = ((heads, W), np.float32)
            self.arrays.update(tok_in=np.zeros((n, vocab), np.int32), tok_next=np.zeros((n, vocab), np.int32),
                               tok_total=np.zeros(vocab, np.int64), tok_next_total=np.zeros(vocab, np.int64))
        else:
            fields = {"x": ((feature_dim,), np.float32), "ci": ((), np.float32), "act": ((), np.float32)}
        self.top = Sample(cfg.top_k, n, fields)
        self.random = Sample(cfg.n_random, n, fields)

    def state(self) -> dict[str, np.ndarray]:
        return {**self.arrays, **self.top.state("top/"), **self.random.state("random/")}

    def load(self, state) -> None:
        self.arrays = {k: state[k] for k in self.arrays}
        self.top.load("top/", state)
        self.random.load("random/", state)


def _payload_maker(ci, act, tokens, x, attn, col_attn, window):
    """make(rows, cols) for `Sample.update` on one batch: ci/act `(B, T, n)` or `(B, n)`."""
    if tokens is None:
        return lambda rows, cols: {"x": x[rows], "ci": ci[rows, cols], "act": act[rows, cols]}
    B, T = tokens.shape
    off = np.arange(-window, window + 1)

    def make(rows, cols):
        b, t = rows // T, rows % T
        pos = t[:, None] + off[None, :]
        ok = (pos >= 0) & (pos < T)
        p = np.clip(pos, 0, T - 1)
        out = {"tok": np.where(ok, tokens[b[:, None], p], -1).astype(np.int32),
               "ci": np.where(ok, ci[b[:, None], p, cols[:, None]], 0.0),
               "act": np.where(ok, act[b[:, None], p, cols[:, None]], 0.0)}
        if attn is not None:
            a = np.zeros((rows.size, next(iter(attn.values())).shape[1], off.size), np.float32)
            for prefix, pattern in attn.items():
                sel = np.flatnonzero(col_attn[cols] == prefix)
                if sel.size:  # pattern (B, H, T, T): the example token's row over the window
                    a[sel] = np.where(ok[sel, None], pattern[b[sel, None, None], np.arange(pattern.shape[1])[None, :, None],
                                                             t[sel, None, None], p[sel, None, :]], 0.0)
            out["attn"] = a
        return out

    return make


def accumulate(acc: Accumulator, ci: np.ndarray, act: np.ndarray, batch_tokens, x, attn, col_attn, key: Array) -> None:
    """Add one batch: ci/act `(B, T, n)` (tokens) or `(B, n)` (features); `key` draws the random sample."""
    cfg, A = acc.cfg, acc.arrays
    n = ci.shape[-1]
    stats = jax.device_get(batch_stats(ci, cfg.tau, cfg.top_k, cfg.n_random, key))
    flat_ci = np.asarray(ci).reshape(-1, n)
    active = flat_ci > cfg.tau
    A["rows"] = A["rows"] + flat_ci.shape[0]
    A["batches"] = A["batches"] + 1
    A["ci_sum"] += stats["ci_sum"]
    A["n_active"] += stats["n_active"]
    A["hist"] += stats["hist"]
    A["coact"] += coactivations(active)
    make = _payload_maker(np.asarray(ci), np.asarray(act), batch_tokens, x, attn, col_attn, cfg.window)
    acc.top.update(*stats["top"], make)
    acc.random.update(*stats["random"], make)
    if batch_tokens is not None:
        V = A["tok_total"].size
        tok = batch_tokens.reshape(-1)
        nxt = np.concatenate([batch_tokens[:, 1:], np.full((batch_tokens.shape[0], 1), -1)], 1).reshape(-1)
        A["tok_total"] += np.bincount(tok, minlength=V)
        A["tok_next_total"] += np.bincount(nxt[nxt >= 0], minlength=V)
        r, c = np.nonzero(active)
        A["tok_in"] += np.bincount(c * V + tok[r], minlength=n * V).reshape(n, V).astype(np.int32)
        m = nxt[r] >= 0
        A["tok_next"] += np.bincount(c[m] * V + nxt[r[m]], minlength=n * V).reshape(n, V).astype(np.int32)


def run_harvest(params, exp, rc, export_sha256: str, outdir: Path, cfg: HarvestConfig, log=print) -> Accumulator:
    """Harvest `params` on `exp`'s held-out stream into an `Accumulator`, resuming from (and saving
    to) `outdir/state.npz`."""
    cfg.validate()
    sigmoid = rc.method.settings.loss.sigmoid
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
    get = held_out_stream(exp, mesh, jax.random.fold_in(jax.random.key(rc.seed), 0x4A7))
    sites = exp.target.sites
    first = get(0)
    if first is None:
        raise ValueError("harvest: the held-out stream is empty")
    tokens0 = _tokens(first)
    col_site = [s.name for s in sites for _ in range(s.C)]
    if tokens0 is not None and exp.tokens is None:
        raise ValueError("harvest: the batches hold tokens but the family gives no Experiment.tokens (vocab_size)")
    attn_fn = exp.tokens.attention if tokens0 is not None else None
    shapes = jax.eval_shape(attn_fn, first) if attn_fn else {}
    prefixes = sorted(shapes)
    col_attn = np.array([next((p for p in prefixes if s.startswith(p + ".")), "") for s in col_site])
    heads = shapes[prefixes[0]].shape[1] if prefixes else None
    vocab = exp.tokens.vocab_size if tokens0 is not None else None
    feature_dim = None if tokens0 is not None else int(np.prod(_features(first).shape[1:]))
    acc = Accumulator(len(col_site), cfg, feature_dim, vocab, heads)
    signature = state_signature(export_sha256, cfg)
    state_file = outdir / STATE
    if state_file.exists():
        with np.load(state_file) as st:
            if str(st["signature"]) == signature:
                acc.load(st)
                log(f"harvest: resuming after {int(acc.arrays['batches'])} batches ({int(acc.arrays['rows'])} rows)")
            else:
                log(f"harvest: {state_file} was made from another decomposition or settings; starting over")
    start = time.perf_counter()
    i = int(acc.arrays["batches"])
    attn_jit = jax.jit(attn_fn) if attn_fn else None
    while int(acc.arrays["rows"]) < cfg.n_rows:
        batch = first if i == 0 else get(i)
        if batch is None:
            break
        ci, act = _site_arrays_jit(params, exp.target, batch, sigmoid)  # on the device until accumulate
        tokens = _tokens(batch)
        attn = {p: np.asarray(v) for p, v in jax.device_get(attn_jit(batch)).items()} if attn_jit else None
        room = cfg.n_rows - int(acc.arrays["rows"])
        per = ci.shape[1] if tokens is not None else 1
        if ci.shape[0] * per > room:  # cut the last batch to whole sequences / inputs
            keep = max(1, room // per)
            ci, act = ci[:keep], act[:keep]
            tokens = tokens[:keep] if tokens is not None else None
            attn = {p: v[:keep] for p, v in attn.items()} if attn else None
            batch = jax.tree.map(lambda a: a[:keep], batch)
        x = None if tokens is not None else np.asarray(_features(batch)).reshape(ci.shape[0], -1)
        key = jax.random.fold_in(jax.random.key(cfg.seed), i)  # a function of the batch index: resumes exactly
        accumulate(acc, ci, act, tokens, x, attn, col_attn, key)
        i += 1
        if i % cfg.save_every == 0:
            save_state(acc, state_file, signature)
    acc.arrays["seconds"] = acc.arrays["seconds"] + (time.perf_counter() - start)
    save_state(acc, state_file, signature)
    return acc


def state_signature(export_sha256: str, cfg: HarvestConfig) -> str:
    """What a saved state must match to be resumed: the decomposition and every harvest setting."""
    return json.dumps({"export": export_sha256, "harvest": dataclasses.asdict(cfg)}, sort_keys=True)


def save_state(acc: Accumulator, path: Path, signature: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, signature=np.array(signature), **acc.state())
    tmp.replace(path)


def _tokens(batch) -> np.ndarray | None:
    """The `(B, T)` integer tokens of a sequence batch (a `tokens` entry or an integer array), else None."""
    a = batch.get("tokens") if isinstance(batch, dict) else batch
    if a is not None and np.issubdtype(a.dtype, np.integer) and a.ndim == 2:
        return np.asarray(a)
    return None


def _features(batch):
    a = batch.get("x", batch.get("inputs")) if isinstance(batch, dict) else batch
    if a is None:
        raise ValueError("harvest: cannot find the feature inputs of the batch (a float array, or 'x'/'inputs')")
    return np.asarray(a)


def write_harvest(acc: Accumulator, params, exp, rc, meta: dict, path: Path, clusters: list | None = None) -> Path:
    """The accumulated harvest as the SQLite file `path` (written beside it, then renamed into place)."""
    cfg, A = acc.cfg, acc.arrays
    sites = exp.target.sites
    rows = max(int(A["rows"]), 1)
    members = [(s, c) for s in sites for c in range(s.C)]
    in_cluster = group_index(clusters or [])
    tokens = "tok_in" in A
    decode = exp.tokens.decode if tokens else None
    vocab_text = [decode(t) for t in range(A["tok_total"].size)] if tokens else None
    tmp = path.with_name(f".{path.name}.tmp")
    con = store.create(tmp)
    meta = {**meta, "n_rows": int(A["rows"]), "tau": cfg.tau, "window": cfg.window, "harvest_seconds": float(A["seconds"]),
            "hist_edges": np.linspace(0, 1, HIST_BINS + 1).tolist(), "input_kind": "tokens" if tokens else "features",
            "sites": [{"name": s.name, "kind": s.kind, "C": s.C, "layer": site_layer(s.name)} for s in sites],
            "harvest": dataclasses.asdict(cfg), "clusters": clusters or []}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v, default=float)) for k, v in meta.items()])
    con.executemany("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        (j, s.name, c, s.kind, site_layer(s.name), float(A["ci_sum"][j] / rows), float(A["n_active"][j] / rows),
         int(A["n_active"][j]), json.dumps(A["hist"][j].tolist()), in_cluster.get((s.name, c)))
        for j, (s, c) in enumerate(members)])

    def payload(sample: Sample, slot: int, j: int) -> dict:
        p = {f: a[slot, j] for f, a in sample.payload.items()}
        if not tokens:
            nz = np.flatnonzero(p["x"])
            return {"features": [[int(i), round(float(p["x"][i]), 4)] for i in nz], "ci": round(float(p["ci"]), 4),
                    "act": round(float(p["act"]), 4)}
        ok = p["tok"] >= 0
        out = {"tokens": [vocab_text[t] for t in p["tok"][ok]], "center": int(cfg.window - np.argmax(ok)),
               "ci": _rounded(p["ci"][ok]), "act": _rounded(p["act"][ok]), "attention": None}
        if "attn" in p and slot < ATTENTION_EXAMPLES:
            a = p["attn"][:, ok]
            out["attention"] = _rounded(a) if a.any() else None
        return out

    examples = []
    for name, sample in (("top", acc.top), ("random", acc.random)):
        for j in range(len(members)):
            for slot in np.flatnonzero(np.isfinite(sample.score[:, j])):
                center = sample.payload["ci"][slot, j]
                ci_c = float(center if not tokens else center[cfg.window])
                examples.append((j, name, int(slot), ci_c, json.dumps(payload(sample, slot, j))))
    con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?)", examples)
    if tokens:
        stats = []
        for which, counts, total in (("input", A["tok_in"], A["tok_total"]), ("next", A["tok_next"], A["tok_next_total"])):
            p_tok = total / max(total.sum(), 1)
            for j in np.flatnonzero(A["n_active"]):
                top = np.argsort(-counts[j], kind="stable")[: cfg.n_tokens]
                top = top[counts[j][top] > 0]
                pmi = np.log((counts[j][top] / max(counts[j].sum(), 1)) / np.maximum(p_tok[top], 1e-12))
                stats += [(int(j), which, r, vocab_text[t], int(counts[j][t]), float(pmi[r])) for r, t in enumerate(top)]
        con.executemany("INSERT INTO token_stats VALUES (?, ?, ?, ?, ?, ?)", stats)
    co, n_act = A["coact"], A["n_active"].astype(np.float64)
    rows_co = []
    for j in np.flatnonzero(n_act):
        c = co[j].copy()
        c[j] = 0
        top = [o for o in np.argsort(-c, kind="stable")[: cfg.n_coactive] if c[o] > 0]
        rows_co += [(int(j), int(o), r, int(c[o]), float(c[o] / n_act[j]), float(c[o] / n_act[o]),
                     float(c[o] / (n_act[j] + n_act[o] - c[o]))) for r, o in enumerate(top)]
    con.executemany("INSERT INTO coactivation VALUES (?, ?, ?, ?, ?, ?, ?)", rows_co)
    if not tokens:
        width = acc.top.payload["x"].shape[-1]
        one_hot = metrics.one_hot_ci(params, exp.target, width, cfg.one_hot_value, rc.method.settings.loss.sigmoid)
        rows_oh, rows_w = [], []
        for j, (s, c) in enumerate(members):
            rows_oh.append((j, json.dumps(_rounded(np.asarray(one_hot[s.name])[:, c], 4))))
            rows_w.append((j, *rank_one_weight(site_components(params.components, s), c)))
        con.executemany("INSERT INTO one_hot VALUES (?, ?)", rows_oh)
        con.executemany("INSERT INTO weights VALUES (?, ?, ?, ?)", rows_w)
    con.commit()
    con.execute("PRAGMA journal_mode=DELETE")  # finished: one self-contained file (WAL only while writing)
    con.close()
    tmp.replace(path)
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return path


def _rounded(a: np.ndarray, digits: int = 3) -> list:
    """Values rounded in float64 (float32's repr would print ~17 digits) for compact JSON."""
    return np.round(np.asarray(a, np.float64), digits).tolist()


def rank_one_weight(comp, c: int) -> tuple[str, str, str]:
    """JSON (row labels, column labels, values) of V_c U_c `(d_in, d_out)`, cut to the `MAX_WEIGHT` rows
    and columns of largest magnitude (kept in index order)."""
    v, u = np.asarray(comp.V[:, c], np.float64), np.asarray(comp.U[c], np.float64)
    rows = np.sort(np.argsort(-np.abs(v), kind="stable")[:MAX_WEIGHT])
    cols = np.sort(np.argsort(-np.abs(u), kind="stable")[:MAX_WEIGHT])
    w = np.outer(v[rows], u[cols])
    return json.dumps(rows.tolist()), json.dumps(cols.tolist()), json.dumps(_rounded(w, 5))
