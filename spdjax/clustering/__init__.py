"""Clustering subcomponents into mechanisms by minimum-description-length merging (clustering.md).

- `mdl`: the description length, the cost of merging two groups, co-activations, packed bits.
- `merge`: the greedy stochastic merge run (jitted), its samplers and history.
- `compare`: adjusted Rand index, purity and the Hungarian matching distance between clusterings.
- `synthetic`: activation matrices with planted groups (ground truth).
- `inputs`: a decomposition's causal importances as a binary activation matrix of its subcomponents.
- `cluster`: merge runs over seeds, the chosen groups, stability across seeds, ground-truth scores.
- `output`: `clusters.json`, `merge_history.npz` and the figures.
- `workflow`: clustering a finished run's workdir (`launch.py --mode=cluster`).

Research code: `acts = binarize(causal_importances(params, target, batches, "leaky_hard"))`, then
`c = cluster(acts, MergeConfig(alpha=1.0), seeds=(0, 1, 2))`, `c.groups()`, `c.stability()`,
`evaluate(c.labels, acts.members, truth)`, `write(c, outdir)`.
"""

from spdjax.clustering.cluster import Clustering, MechanismTruth, cluster, evaluate, one_hot_mechanisms
from spdjax.clustering.compare import adjusted_rand_index, matching_distance, purity
from spdjax.clustering.inputs import Activations, binarize, causal_importances
from spdjax.clustering.mdl import coactivations, description_length, merge_costs
from spdjax.clustering.merge import SAMPLERS, MergeConfig, MergeHistory, merge
from spdjax.clustering.output import write
from spdjax.clustering.synthetic import planted_groups

__all__ = [
    "SAMPLERS",
    "Activations",
    "Clustering",
    "MechanismTruth",
    "binarize",
    "causal_importances",
    "cluster",
    "evaluate",
    "one_hot_mechanisms",
    "write",
    "MergeConfig",
    "MergeHistory",
    "adjusted_rand_index",
    "coactivations",
    "description_length",
    "matching_distance",
    "merge",
    "merge_costs",
    "planted_groups",
    "purity",
]
