"""Clustering a decomposition's subcomponents: merge runs over seeds, the chosen groups, their
stability across seeds and their agreement with a ground truth.

`cluster(activations, MergeConfig(...), seeds=(0, 1, 2))` runs one merge per seed; the chosen
clustering is the first seed's at its stopping point; `stability` compares every pair of seeds'
clusterings by the Hungarian matching distance at their stops and at fixed fractions of the run.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import numpy as np

from spdjax import metrics
from spdjax.clustering.compare import adjusted_rand_index, matching_distance, purity
from spdjax.clustering.inputs import Activations
from spdjax.clustering.merge import MergeConfig, MergeHistory, merge

STABILITY_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)  # fractions of the n - 1 merges where seeds are compared


@dataclasses.dataclass(frozen=True)
class Clustering:
    """activations: the merge's input; config; seeds; histories[i]: seed i's merge run; labels: the
    chosen clustering `(n,)` (the first seed's at its stop), numbered by first member."""

    activations: Activations
    config: MergeConfig
    seeds: tuple[int, ...]
    histories: tuple[MergeHistory, ...]

    @property
    def labels(self) -> np.ndarray:
        return self.histories[0].labels()

    def groups(self) -> list[dict]:
        """Per group, largest first: members `[[site, index], ...]`, size, activation frequency (the
        fraction of rows where any member is active) and each member's own frequency."""
        acts, labels = self.activations.acts, self.labels
        out = []
        for g in range(labels.max() + 1):
            cols = np.flatnonzero(labels == g)
            out.append({
                "members": [list(self.activations.members[c]) for c in cols],
                "size": int(cols.size),
                "frequency": float(acts[:, cols].any(axis=1).mean()),
                "member_frequency": [float(self.activations.frequency[c]) for c in cols],
            })
        out.sort(key=lambda d: (-d["size"], -d["frequency"]))
        return out

    def stability(self) -> dict[str, float]:
        """Mean (and max) matching distance over pairs of seeds at their stops and after each fraction of
        `STABILITY_FRACTIONS` of the merges; empty with one seed."""
        if len(self.histories) < 2:
            return {}
        out = {}
        pairs = list(itertools.combinations(self.histories, 2))
        at_stop = [matching_distance(a.labels(), b.labels()) for a, b in pairs]
        out["stop/mean"], out["stop/max"] = float(np.mean(at_stop)), float(np.max(at_stop))
        n_merges = len(self.histories[0].pairs)
        for f in STABILITY_FRACTIONS:
            t = int(round(f * n_merges))
            d = [matching_distance(a.labels_at(t), b.labels_at(t)) for a, b in pairs]
            out[f"at_{f:g}/mean"], out[f"at_{f:g}/max"] = float(np.mean(d)), float(np.max(d))
        return out


def cluster(activations: Activations, config: MergeConfig = MergeConfig(), seeds: Sequence[int] = (0,)) -> Clustering:
    """One merge run per seed on `activations` (see `merge.merge`)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("cluster: give at least one seed")
    if activations.acts.shape[1] < 2:
        raise ValueError(
            f"cluster: {activations.acts.shape[1]} subcomponent(s) above the frequency floor "
            f"{activations.freq_floor} at tau {activations.tau}; need at least 2 (lower the floor or tau)"
        )
    histories = tuple(merge(activations.acts, config, seed=s) for s in seeds)
    return Clustering(activations, config, seeds, histories)


def group_index(groups: Sequence[dict]) -> dict[tuple[str, int], int]:
    """`{(site, index): group number}` of `clusters.json`'s groups."""
    return {(site, int(idx)): g for g, group in enumerate(groups) for site, idx in group["members"]}


@dataclasses.dataclass(frozen=True)
class MechanismTruth:
    """A ground truth for a decomposition: per site `(C,)` the mechanism (e.g. feature) each
    subcomponent serves, -1 where it serves none in particular (e.g. an identity subcomponent, used by
    every feature); `layers`: per site its layer, for the cross-layer fraction."""

    labels: Mapping[str, np.ndarray]
    layers: Mapping[str, int] = dataclasses.field(default_factory=dict)


def evaluate(labels: np.ndarray, members: Sequence[tuple[str, int]], truth: MechanismTruth) -> dict[str, float]:
    """Agreement of a clustering with `truth`, over the clustered subcomponents that have a mechanism:
    - `ari`, `purity` (of predicted groups against mechanisms), `n_scored`;
    - `separated`: fraction of mechanisms no group of which holds another mechanism's subcomponent
      (1 for TMS when every feature's subcomponents sit in groups of their own);
    - `cross_layer`: fraction of the groups of two or more subcomponents whose members sit in more
      than one layer (only where `truth.layers` names layers)."""
    labels = np.asarray(labels)
    mech = np.array([int(truth.labels[s][c]) if s in truth.labels else -1 for s, c in members])
    scored = mech >= 0
    out: dict[str, float] = {"n_scored": int(scored.sum()), "n_groups": int(np.unique(labels).size)}
    if scored.sum() >= 2:
        out["ari"] = adjusted_rand_index(labels[scored], mech[scored])
        out["purity"] = purity(labels[scored], mech[scored])
        mixed = {g for g in np.unique(labels[scored]) if np.unique(mech[scored & (labels == g)]).size > 1}
        per_mech = [not ({*labels[scored & (mech == m)]} & mixed) for m in np.unique(mech[scored])]
        out["separated"] = float(np.mean(per_mech))
        out["n_mechanisms"] = int(len(per_mech))
    if truth.layers:
        layer = np.array([truth.layers.get(s, -1) for s, _ in members])
        multi = [g for g in np.unique(labels) if (labels == g).sum() >= 2]
        if multi:
            out["cross_layer"] = float(np.mean([np.unique(layer[labels == g]).size > 1 for g in multi]))
    return out


def one_hot_mechanisms(
    params, target, sigmoid: str, n_features: int, value: float, threshold: float = 0.1,
    none_kinds: Sequence[str] = ("identity",), layer_of=None,
) -> MechanismTruth:
    """The toys' ground truth: each subcomponent serves the feature whose one-hot input `value * e_f`
    gives it the largest CI (-1 where that CI is below `threshold`, and for sites of `none_kinds`,
    e.g. identity subcomponents, which every feature uses). `layer_of(site name) -> int` names layers."""
    ci = metrics.one_hot_ci(params, target, n_features, value, sigmoid)
    labels = {}
    for spec in target.sites:
        c = np.asarray(ci[spec.name])
        best = np.argmax(c, axis=0)
        labels[spec.name] = np.where((c.max(axis=0) >= threshold) & (spec.kind not in none_kinds), best, -1)
    layers = {s.name: int(layer_of(s.name)) for s in target.sites} if layer_of else {}
    return MechanismTruth(labels, layers)
