"""A harvest on disk: one SQLite file (stdlib `sqlite3`, WAL journal) that other tools can read.

Tables (`component` ids are 0..n-1 in site order, then index):
- `meta(key TEXT PRIMARY KEY, value TEXT)`: JSON values: `config` (the run's config), `export_sha256`
  (hash of the decomposition the harvest was made from), `spdjax_version`, `input_kind` (`tokens` or
  `features`), `n_rows` (inputs or token positions harvested), `tau`, `window`, `summary` (the run's
  summary.json), `eval` (the run's eval.jsonl records), `sites` ([{name, kind, C, layer}]),
  `harvest_seconds`, `clusters` (clusters.json's groups, when clustering ran).
- `components(id, site, idx, kind, layer, mean_ci, frequency, n_active, hist, cluster)`: `hist` JSON
  counts of CI over `meta.hist_edges`; `cluster` the group id in clusters.json (NULL: none).
- `examples(component, sampling, rank, ci, payload)`: `sampling` `top` (largest CI) or `random` (a
  uniform sample of the rows where it is active); `payload` JSON:
  tokens: `{"tokens": [str], "center": int, "ci": [float], "act": [float], "attention": [[float]] | null}`
  (the window around the example's token; `act` the inner activation x V_c; `attention` the
  example token's attention row over the window, per head, for attention sites);
  features: `{"features": [[i, value], ...], "ci": float, "act": float}` (the input's nonzero features).
- `token_stats(component, which, rank, token, count, pmi)`: `which` `input` (the token at the active
  position) or `next` (the token after it); the top tokens by count, with PMI log(P(t | active) / P(t)).
- `coactivation(component, other, rank, count, precision, recall, jaccard)`: the most co-active others;
  precision = count / n_active(component), recall = count / n_active(other).
- `one_hot(component, ci)` (toys): JSON CI on each feature's one-hot input.
- `weights(component, row_labels, col_labels, values)` (toys): JSON, the rank-one weight V_c U_c
  (at most `MAX_WEIGHT` rows and columns: the largest by magnitude, labelled by their index).

`read(path)` returns it as one JSON-able dict (`meta`, `components`: list of dicts with their
examples, token stats, co-activations, one-hot response and weight), what the report embeds.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE components (id INTEGER PRIMARY KEY, site TEXT NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL,
  layer INTEGER, mean_ci REAL NOT NULL, frequency REAL NOT NULL, n_active INTEGER NOT NULL, hist TEXT NOT NULL,
  cluster INTEGER, UNIQUE (site, idx));
CREATE TABLE examples (component INTEGER NOT NULL REFERENCES components(id), sampling TEXT NOT NULL,
  rank INTEGER NOT NULL, ci REAL NOT NULL, payload TEXT NOT NULL);
CREATE TABLE token_stats (component INTEGER NOT NULL REFERENCES components(id), which TEXT NOT NULL,
  rank INTEGER NOT NULL, token TEXT NOT NULL, count INTEGER NOT NULL, pmi REAL NOT NULL);
CREATE TABLE coactivation (component INTEGER NOT NULL REFERENCES components(id), other INTEGER NOT NULL,
  rank INTEGER NOT NULL, count INTEGER NOT NULL, precision REAL NOT NULL, recall REAL NOT NULL,
  jaccard REAL NOT NULL);
CREATE TABLE one_hot (component INTEGER PRIMARY KEY REFERENCES components(id), ci TEXT NOT NULL);
CREATE TABLE weights (component INTEGER PRIMARY KEY REFERENCES components(id), row_labels TEXT NOT NULL,
  col_labels TEXT NOT NULL, "values" TEXT NOT NULL);
CREATE INDEX examples_c ON examples(component);
CREATE INDEX token_stats_c ON token_stats(component);
CREATE INDEX coactivation_c ON coactivation(component);
"""
TABLES = ("meta", "components", "examples", "token_stats", "coactivation", "one_hot", "weights")


def create(path: str | Path) -> sqlite3.Connection:
    """A new, empty harvest file at `path` (an existing one is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    return con


def read_meta(path: str | Path) -> dict:
    """The `meta` table as a dict of decoded JSON values."""
    with contextlib.closing(_open(path)) as con:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def _open(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to the harvest at `path` (the caller closes it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no harvest file (run launch.py --mode=harvest first)")
    # as_uri() percent-encodes, so names with `?`, `#` or `%` survive the URI form.
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        missing = set(TABLES) - {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        con.close()
        raise ValueError(f"{path}: not a readable harvest file ({e})") from None
    if missing:
        con.close()
        raise ValueError(f"{path}: not a harvest file (missing tables {sorted(missing)})")
    return con


def read(path: str | Path) -> dict:
    """The whole harvest as one JSON-able dict: `{"meta": {...}, "components": [{id, site, idx, kind,
    layer, mean_ci, frequency, n_active, hist, cluster, examples: {"top": [...], "random": [...]},
    tokens: {"input": [...], "next": [...]}, coactive: [...], one_hot, weight}]}`."""
    with contextlib.closing(_open(path)) as con:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        cols = ("id", "site", "idx", "kind", "layer", "mean_ci", "frequency", "n_active", "hist", "cluster")
        comps, by_id = [], {}
        for row in con.execute(f"SELECT {', '.join(cols)} FROM components ORDER BY id"):
            c = dict(zip(cols, row))
            c["hist"] = json.loads(c["hist"])
            c.update(examples={"top": [], "random": []}, tokens={"input": [], "next": []}, coactive=[],
                     one_hot=None, weight=None)
            comps.append(c)
            by_id[c["id"]] = c
        for cid, sampling, ci, payload in con.execute(
                "SELECT component, sampling, ci, payload FROM examples ORDER BY component, sampling, rank"):
            by_id[cid]["examples"].setdefault(sampling, []).append({"ci": ci, **json.loads(payload)})
        for cid, which, token, count, pmi in con.execute(
                "SELECT component, which, token, count, pmi FROM token_stats ORDER BY component, which, rank"):
            by_id[cid]["tokens"].setdefault(which, []).append({"token": token, "count": count, "pmi": pmi})
        for cid, other, count, p, r, j in con.execute(
                "SELECT component, other, count, precision, recall, jaccard FROM coactivation "
                "ORDER BY component, rank"):
            by_id[cid]["coactive"].append({"other": other, "count": count, "precision": p, "recall": r, "jaccard": j})
        for cid, ci in con.execute("SELECT component, ci FROM one_hot"):
            by_id[cid]["one_hot"] = json.loads(ci)
        for cid, rows, cols_, values in con.execute('SELECT component, row_labels, col_labels, "values" FROM weights'):
            by_id[cid]["weight"] = {"rows": json.loads(rows), "cols": json.loads(cols_), "values": json.loads(values)}
    return {"meta": meta, "components": comps}
