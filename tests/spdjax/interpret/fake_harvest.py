"""Small hand-made harvests in `store.read`'s format, and `write` to put one in a harvest file with plain
SQL INSERTs (so the reader is checked against the documented tables, not against the harvester)."""

from __future__ import annotations

import json
from pathlib import Path

from spdjax.interpret import store

EVIL = "</script><b>x"  # a token that must stay text in the report
ATTN, MLP = "layers.0.attn.q", "layers.0.mlp_in"
EDGES = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def _component(cid, site, idx, layer, mean_ci, frequency, n_active, cluster, kind="linear"):
    return {"id": cid, "site": site, "idx": idx, "kind": kind, "layer": layer, "mean_ci": mean_ci,
            "frequency": frequency, "n_active": n_active, "hist": [n_active * 3, n_active, 4, 2, 1],
            "cluster": cluster, "examples": {"top": [], "random": []}, "tokens": {"input": [], "next": []},
            "coactive": [], "one_hot": None, "weight": None}


def _token_example(tokens, cis, attention=None):
    center = len(tokens) // 2
    return {"tokens": tokens, "center": center, "ci": cis, "act": [round(0.5 - c, 3) for c in cis],
            "attention": attention}


def token_harvest() -> dict:
    """A token harvest: 6 components in 2 sites (attention rows on the attention site), examples with
    `EVIL` in component 0's first one, token statistics, co-activations and two clusters."""
    comps = [
        _component(0, ATTN, 1, 0, 0.31, 0.12, 120, 0),
        _component(1, ATTN, 4, 0, 0.05, 0.02, 20, 0),
        _component(2, ATTN, 7, 0, 0.12, 0.30, 300, None),
        _component(3, MLP, 0, 0, 0.22, 0.08, 80, 0),
        _component(4, MLP, 2, 0, 0.01, 0.001, 1, 1),
        _component(5, MLP, 9, 0, 0.09, 0.05, 50, None),
    ]
    words = ["the", "cat", " sat", "on", "\n", "mat", "dog", "ran", "fast", EVIL, "a", "tree"]
    for c in comps:
        k = c["id"]
        for sampling, n in (("top", 3), ("random", 2)):
            for r in range(n):
                toks = [words[(k + r + j) % len(words)] for j in range(5)]
                if k == 0 and sampling == "top" and r == 0:
                    toks[2] = EVIL
                cis = [0.0, 0.02, round(0.95 - 0.1 * r - 0.2 * (sampling == "random"), 3), 0.4, 0.01]
                att = [[0.1, 0.2, 0.4, 0.2, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]] if c["site"] == ATTN else None
                c["examples"][sampling].append(_token_example(toks, cis, att))
        c["tokens"]["input"] = [{"token": "cat" if (k, j) == (1, 0) else words[(k + 2 + j) % len(words)],
                                 "count": 30 - 7 * j, "pmi": round(2.0 - 0.5 * j, 3)} for j in range(3)]
        c["tokens"]["next"] = [{"token": words[(k + 5 + j) % len(words)], "count": 20 - 5 * j,
                                "pmi": round(1.5 - 0.4 * j, 3)} for j in range(2)]
        c["coactive"] = [{"other": o, "count": 10 - 3 * i, "precision": round(0.8 - 0.2 * i, 3),
                          "recall": round(0.5 - 0.1 * i, 3), "jaccard": round(0.4 - 0.1 * i, 3)}
                         for i, o in enumerate([(k + 3) % 6, (k + 1) % 6])]
    meta = {
        "config": {"target": "tiny_transformer", "seed": 0},
        "export_sha256": "ab" * 32,
        "spdjax_version": "0.1.0",
        "input_kind": "tokens",
        "n_rows": 4096,
        "tau": 0.1,
        "window": 5,
        "hist_edges": EDGES,
        "summary": {f"ci_l0/{ATTN}": 2.5, f"ci_l0/{MLP}": 4.25, "loss/stochastic_recon": 0.031,
                    "loss/faithfulness": 1e-5, "ce_unrecovered": 0.12},
        "eval": [{"step": s, "eval/loss/stochastic_recon": 0.5 / (1 + s), "eval/loss/faithfulness": 0.01 / (1 + s),
                  f"eval/ci_l0/{ATTN}": 8.0 - s / 100, "eval/ce_unrecovered": 0.3} for s in (0, 100, 200, 300)],
        "sites": [{"name": ATTN, "kind": "linear", "C": 8, "layer": 0},
                  {"name": MLP, "kind": "linear", "C": 16, "layer": 0}],
        "harvest_seconds": 12.5,
        # group 0 has a member (MLP, 15) the harvest does not hold
        "clusters": [{"members": [[ATTN, 1], [ATTN, 4], [MLP, 0], [MLP, 15]], "size": 4, "frequency": 0.15},
                     {"members": [[MLP, 2]], "size": 1, "frequency": 0.001}],
    }
    return {"meta": meta, "components": comps}


def feature_harvest() -> dict:
    """A toy (feature-input) harvest: 4 components in 2 sites, with one-hot responses and weights, co-activations,
    no clusters and no eval records."""
    sites = ["linear1", "linear2"]
    comps = [_component(i, sites[i // 2], 3 * i, i // 2, 0.2 - 0.04 * i, 0.1 - 0.02 * i, 40 - 5 * i, None)
             for i in range(4)]
    for c in comps:
        k = c["id"]
        for sampling, n in (("top", 2), ("random", 2)):
            c["examples"][sampling] = [{"features": [[k, round(0.9 - 0.1 * r, 3)], [k + 2, 0.25]],
                                        "ci": round(0.97 - 0.1 * r - 0.3 * (sampling == "random"), 3),
                                        "act": round(1.5 - 0.2 * r, 3)} for r in range(n)]
        c["one_hot"] = [0.9 if f == k else 0.02 * f for f in range(5)]
        c["weight"] = {"rows": [str(k), str(k + 2), "7"], "cols": ["0", "3", "4"],
                       "values": [[0.5, -0.25, 0.0], [0.1, 0.2, -0.3], [0.0, 0.05, 1.0]]}
        c["coactive"] = [{"other": (k + 1) % 4, "count": 5, "precision": 0.5, "recall": 0.25, "jaccard": 0.2}]
    meta = {"config": {"target": "tms"}, "export_sha256": "cd" * 32, "spdjax_version": "0.1.0",
            "input_kind": "features", "n_rows": 1000, "tau": 0.1, "window": 1, "hist_edges": EDGES,
            "summary": {"ci_l0/linear1": 1.5, "ci_l0/linear2": 1.25, "loss/faithfulness": 0.002},
            "sites": [{"name": s, "kind": "linear", "C": 10, "layer": i} for i, s in enumerate(sites)],
            "harvest_seconds": 0.75}
    return {"meta": meta, "components": comps}


def write(path: str | Path, harvest: dict) -> Path:
    """Writes `harvest` (in `store.read`'s format) to a new harvest file at `path`; returns the path."""
    con = store.create(path)
    with con:
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in harvest["meta"].items()])
        for c in harvest["components"]:
            cid = c["id"]
            con.execute("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (cid, c["site"], c["idx"], c["kind"], c["layer"], c["mean_ci"], c["frequency"],
                         c["n_active"], json.dumps(c["hist"]), c["cluster"]))
            for sampling, examples in c["examples"].items():
                for rank, ex in enumerate(examples):
                    ci = ex["ci"][ex["center"]] if "tokens" in ex else ex["ci"]
                    con.execute("INSERT INTO examples VALUES (?, ?, ?, ?, ?)",
                                (cid, sampling, rank, ci, json.dumps(ex)))
            for which, stats in c["tokens"].items():
                for rank, t in enumerate(stats):
                    con.execute("INSERT INTO token_stats VALUES (?, ?, ?, ?, ?, ?)",
                                (cid, which, rank, t["token"], t["count"], t["pmi"]))
            for rank, o in enumerate(c["coactive"]):
                con.execute("INSERT INTO coactivation VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (cid, o["other"], rank, o["count"], o["precision"], o["recall"], o["jaccard"]))
            if c["one_hot"] is not None:
                con.execute("INSERT INTO one_hot VALUES (?, ?)", (cid, json.dumps(c["one_hot"])))
            if c["weight"] is not None:
                w = c["weight"]
                con.execute("INSERT INTO weights VALUES (?, ?, ?, ?)",
                            (cid, json.dumps(w["rows"]), json.dumps(w["cols"]), json.dumps(w["values"])))
    con.close()
    return Path(path)
