"""Clustering subcomponents into mechanisms by minimum-description-length merging (clustering.md).

- `mdl`: the description length, the cost of merging two groups, co-activations, packed bits.
- `merge`: the greedy stochastic merge run (jitted), its samplers and history.
- `compare`: adjusted Rand index, purity and the Hungarian matching distance between clusterings.
- `synthetic`: activation matrices with planted groups (ground truth).
"""

from spdjax.clustering.compare import adjusted_rand_index, matching_distance, purity
from spdjax.clustering.mdl import coactivations, description_length, merge_costs
from spdjax.clustering.merge import SAMPLERS, MergeConfig, MergeHistory, merge
from spdjax.clustering.synthetic import planted_groups

__all__ = [
    "SAMPLERS",
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
