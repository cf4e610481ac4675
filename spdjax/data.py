"""Where a run's batches come from: an on-device sampler, or a host-side iterator saved with checkpoints.

- **On-device sampler** (`Experiment.batch_fn(key) -> batch`, pure and jittable): the batch of step t
  is sampled inside the jitted step from `fold_in(fold_in(key, t), 0)`, so the data stream is a
  function of (seed, step) and needs no state of its own. The toys use this.
- **Host-side data** (`Experiment.host_data`, a `HostData`): `train_iterator()` yields this process's
  rows of each global batch as NumPy arrays, and has Grain's checkpointable-iterator interface
  (`get_state() -> JSON-able dict`, `set_state(state)`); the runner saves the state with every
  checkpoint and restores it on resume, so a resumed run reads exactly the batches an uninterrupted run
  would. `held_out(index)` gives held-out batches for evaluation. `GrainData` wraps a `grain`
  dataset; anything with the same three methods works.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable


@runtime_checkable
class CheckpointableIterator(Protocol):
    def __next__(self) -> Any: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@runtime_checkable
class HostData(Protocol):
    def train_iterator(self) -> CheckpointableIterator: ...

    def held_out(self, index: int) -> Any: ...


class GrainData:
    """`HostData` from Grain datasets: `train` (a `grain.MapDataset` or `grain.IterDataset` of batches,
    e.g. `MapDataset.source(x).shuffle(seed=...).repeat().batch(n)`) and `held_out(index) -> batch`."""

    def __init__(self, train: Any, held_out: Callable[[int], Any]):
        self._train = train
        self._held_out = held_out

    def train_iterator(self) -> CheckpointableIterator:
        ds = self._train
        if hasattr(ds, "to_iter_dataset"):
            ds = ds.to_iter_dataset()
        return iter(ds)

    def held_out(self, index: int) -> Any:
        return self._held_out(index)


def iterate(it: CheckpointableIterator) -> Iterator[Any]:
    """A plain Python iterator view (the state stays readable on `it`)."""
    while True:
        yield next(it)
