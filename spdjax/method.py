"""The seam between the runner and a decomposition method (SPD, APD, ...).

A method is a class implementing `Method`: it parses its own config sections, makes and exports its
parameters, gives the loss the one train step differentiates, any parameter hooks around the
gradient, its gradient transformations (in front of Adam) and how its parameters are sharded, and
evaluates and analyses a decomposition. The runner (`spdjax.runner`), the train step and loop
(`spdjax.train`) and the benchmark (`experiments.benchmark`) know nothing else about a method.
Adding a method = one module with a `Method` subclass + its entry in `spdjax.methods.METHODS`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import jax
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from spdjax.experiment import Experiment
from spdjax.optim import OptimConfig
from spdjax.targets.base import Target


class Method(abc.ABC):
    """One decomposition method, holding its parsed settings (`self.settings`, a frozen dataclass)."""

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]  # the top-level config sections this method reads
    params_type: ClassVar[type]  # the pytree class of its parameters (found inside optimiser states)

    def __init__(self, settings: Any):
        self.settings = settings

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash((type(self), self.settings))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, optim: OptimConfig) -> "Method":
        """Parse the method's sections of a run config (errors name the field) and check `optim`."""

    # ---------------------------------------------------------------- parameters
    @abc.abstractmethod
    def init_params(self, key: Array, target: Target, dtype) -> Any:
        """Fresh parameters for `target`, in `dtype`."""

    def prepare(self, params: Any, target: Target, optim: OptimConfig) -> Any:
        """Anything run once on fresh parameters before step 0 (jittable)."""
        return params

    def gradient_transforms(self, optim: OptimConfig) -> tuple[optax.GradientTransformation, ...]:
        """Transformations applied to the gradients in front of Adam."""
        return ()

    def param_specs(self, params: Any, mesh: Mesh) -> Any:
        """PartitionSpecs of the parameters (a tree like `params`); default: replicated."""
        return jax.tree.map(lambda _: P(), params)

    # ---------------------------------------------------------------- the train step
    @abc.abstractmethod
    def loss(self, params: Any, target: Target, batch: Any, key: Array, progress: Array) -> tuple[Array, dict]:
        """`(loss, metrics)`: pure, jittable, differentiable in `params`; `progress` in [0, 1]."""

    def constrain(self, params: Any) -> Any:
        """Applied to the parameters before the loss and the update (e.g. a norm constraint)."""
        return params

    def project_grads(self, grads: Any, params: Any) -> Any:
        """Applied to the gradients before the optimiser."""
        return grads

    def grad_metrics(self, grads: Any) -> dict[str, Array]:
        return {"grad_norm/components": optax.tree.norm(grads)}

    # ---------------------------------------------------------------- evaluation and outputs
    def eval_metrics(self, params: Any, target: Target, batch: Any, key: Array) -> dict[str, Array]:
        """Jittable metrics on a held-out batch (every loss term, ...); default: none."""
        return {}

    @abc.abstractmethod
    def analyze(self, params: Any, exp: Experiment, batch: Any, workdir: Path | None) -> dict:
        """Host-side summary of a decomposition (flat JSON-able values); figures into `workdir` unless None."""

    @abc.abstractmethod
    def export(self, path: Path, params: Any, target: Target, extra: dict) -> None:
        """Write the decomposition into directory `path`."""

    @abc.abstractmethod
    def load(self, path: Path, target: Target) -> tuple[Any, dict]:
        """`(params, extra)` of a decomposition written by `export` (checked against `target`'s sites)."""
